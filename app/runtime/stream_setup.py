"""The streaming engine for a plan: which layers a loaded model streams, and what its batches may write."""

from __future__ import annotations

import os
from typing import Any

from corral.app.runtime.stream_units import row_spans, step_spans, units_of
from corral.app.runtime.streaming import Streamer


def for_plan(plan: Any, model_file: Any, settings: Any) -> Streamer | None:
    """A streamer when the plan streams weights from disk through mmap (CORRAL_STREAMING=0 turns it off)."""
    if not plan.disk_stream_bytes or not settings.use_mmap or os.environ.get("CORRAL_STREAMING") == "0":
        return None
    n_layer = int(model_file.arch_key("{arch}.block_count", 0) or 0)
    on_gpu = 0
    if any(d.kind in ("gpu", "rpc") for d in plan.devices):  # RPC workers' devices take layers as GPUs do
        on_gpu = settings.n_gpu_layers if settings.n_gpu_layers >= 0 else n_layer + 1
    # llama.cpp puts the output head on the GPU first, then the last layers (unit n_layer is the head)
    first_gpu = max(0, n_layer + 1 - on_gpu)
    units = [u for u in units_of(model_file.tensors, n_layer) if u.index < first_gpu]
    if not units:
        return None
    from corral.offload.memory import touched_compute_bytes
    from corral.offload.profile import profile_of

    profile = profile_of(model_file, model_file.files[0])
    n_ctx = settings.n_ctx or profile.n_ctx_train

    def touched(n_tokens: int) -> int:
        return touched_compute_bytes(profile, n_ctx, min(n_tokens, settings.n_ubatch), settings.flash_attn)

    return Streamer(units, plan.disk_stream_bytes, n_layer, reserve=touched(settings.n_ubatch), touched=touched,
                    rows=row_spans(model_file.tensors), steps=step_spans(model_file.tensors))


__all__ = ["for_plan"]
