"""Real-GPU checks (marked `gpu`): skipped on machines without an NVIDIA GPU and a CUDA build of llama.cpp.

Elsewhere GPU placement is tested with simulated devices (tests/test_plan.py); these confirm, on real
hardware, that the plan's GPU layers reach llama.cpp and that the planned VRAM is close to what is used.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.engine import EngineOptions, load_engine
from corral.offload.hardware import probe_gpus

pytestmark = pytest.mark.gpu


def _gpu_ready() -> str | None:
    import llama_cpp

    if not probe_gpus():
        return "no NVIDIA GPU found through NVML"
    if not llama_cpp.llama_supports_gpu_offload():
        return "llama-cpp-python was built without GPU offload (CMAKE_ARGS=-DGGML_CUDA=on)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _require_gpu() -> None:
    reason = _gpu_ready()
    if reason:
        pytest.skip(reason)


def _vram_used(index: int = 0) -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    finally:
        pynvml.nvmlShutdown()


def test_plan_offloads_every_layer_and_vram_matches(mini_gguf_f32: Path) -> None:
    before = _vram_used()
    engine = load_engine(mini_gguf_f32, EngineOptions(n_ctx=4096))
    try:
        plan = engine.plan
        assert plan.n_gpu_layers >= 3  # 2 layers + the output layer of the miniature model
        log = "\n".join(engine.load_log)
        assert "offloaded" in log and "to GPU" in log
        gen = engine.generate([Message("user", "Hello")], SamplingSettings(temperature=0.0, max_tokens=8))
        assert gen.stats.completion_tokens > 0
        used = _vram_used() - before
        planned = next(d for d in plan.devices if d.name == "GPU0").total_bytes
        # the plan includes a safety margin and CUDA's context; it must not under-estimate by much
        assert used <= planned * 1.25, (used, planned)
    finally:
        engine.close()
