"""The streaming engine with layers cut between the two sets: a layer's first part resident, its last part streamed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corral.app.runtime import stream_units, streaming
from corral.app.runtime.api import SamplingSettings
from corral.app.runtime.engine import load_engine
from corral.app.runtime.stream_units import units_of
from corral.convert.gguf_file import read_gguf
from tests.helpers.engine import cpu_plan, write_tiny_gguf
from tests.helpers.stream import greedy_in_ram

N_LAYERS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("sliced") / "s.gguf", hidden=256, n_heads=4, ffn=512,
                           n_layers=N_LAYERS, layer_dtype=np.float32)


def test_sliced_streaming_gives_the_same_greedy_tokens(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices smaller than a layer (this model's layers are ~2.5 MiB, so slices of at least 512 KiB): a layer's
    first part stays resident, its last part streams, read ahead and dropped each token; the tokens do not change."""
    monkeypatch.setattr(streaming, "choose", lambda units, sb, window, least=None: stream_units.choose(
        units, sb, window, least=512 * 1024))
    settings = SamplingSettings(temperature=0.0, max_tokens=16)
    _, want = greedy_in_ram(model, "The llama", settings)
    total = sum(u.nbytes for u in units_of(read_gguf(model).tensors, N_LAYERS))
    engine = load_engine(model, plan=cpu_plan(n_ctx=256, disk_stream_bytes=total // 4))
    try:
        s = engine.streamer
        assert s is not None
        cut = {u.index for u in s.sets.streamed} & {u.index for u in s.sets.resident}
        assert len(cut) >= 3  # layers split between the two sets
        engine.complete("The llama", settings)
        assert list(engine.last_completion_tokens) == want
        assert s.positions >= 16 * (N_LAYERS + 1)
    finally:
        engine.close()
