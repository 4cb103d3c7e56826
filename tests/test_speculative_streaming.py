"""Speculative decoding with a target that streams its weights from disk: the draft is loaded before the streamer
sizes its resident set and read into its own memory, and a useless draft is closed so the model keeps more."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from corral.app.runtime import engine as engine_mod
from corral.app.runtime.api import Message
from corral.app.runtime.engine import EngineOptions, LlamaEngine, load_engine
from corral.app.runtime.speculative import Speculator
from corral.convert.gguf_file import read_gguf
from tests.helpers.engine import cpu_plan
from tests.helpers.speculative import GREEDY, PROMPTS, spec_models
from tests.helpers.speculative import run_greedy as _run


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return spec_models(tmp_path_factory.mktemp("spec-stream"))


@pytest.fixture(scope="module")
def target(models: dict[str, Path]) -> Iterator[LlamaEngine]:
    with load_engine(models["target"], plan=cpu_plan()) as eng:
        yield eng


def _streaming_plan(model: Path) -> object:
    from corral.app.runtime.streaming import units_of

    mf = read_gguf(model)
    total = sum(u.nbytes for u in units_of(mf.tensors, int(mf.arch_key("{arch}.block_count", 0))))
    return cpu_plan(disk_stream_bytes=total // 2)


def test_a_streaming_target_loads_the_draft_first_and_off_mmap(models: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamer sizes its resident set by the memory in use when it starts, so the draft must be loaded by
    then; and the draft is read into its own memory, where the target's stream cannot evict it."""
    from corral.app.runtime import streaming

    order: list[str] = []
    real_attach, real_start = engine_mod.attach_draft, streaming.Streamer.start
    monkeypatch.setattr(engine_mod, "attach_draft", lambda *a, **k: (order.append("draft"), real_attach(*a, **k)))
    monkeypatch.setattr(streaming.Streamer, "start", lambda self: (order.append("stream"), real_start(self)))
    eng = load_engine(models["target"], EngineOptions(draft=str(models["draft"])), plan=_streaming_plan(models["target"]))
    try:
        assert order == ["draft", "stream"] and eng.streamer is not None
        assert eng.speculator.draft.settings.use_mmap is False
        assert eng.settings.use_mmap is True  # the target itself still streams through llama.cpp's mapping
    finally:
        eng.close()
    plain = load_engine(models["target"], EngineOptions(draft=str(models["draft"])), plan=cpu_plan())
    try:
        assert plain.streamer is None and plain.speculator.draft.settings.use_mmap is True
    finally:
        plain.close()


def test_a_useless_draft_is_released_when_the_target_streams(models: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Its memory costs a streaming target streamed bytes on every token, drafting or not: after two lost probes
    the draft is closed, the streamer is told to keep more resident, and the tokens stay the target's."""
    from corral.app.runtime import streaming

    settings = replace(GREEDY, max_tokens=120)
    with load_engine(models["target"], plan=cpu_plan()) as plain:
        want, _ = _run(plain, [Message("user", PROMPTS[0])], settings)
    eng = load_engine(models["target"], EngineOptions(draft=str(models["other"])), plan=_streaming_plan(models["target"]))
    try:
        streamer, spec = eng.streamer, eng.speculator
        before = streamer.sets.streamed_bytes
        monkeypatch.setattr(streaming, "measured_stream_bytes", lambda units, reserve=0: before // 4)
        got, result = _run(eng, [Message("user", PROMPTS[0])], settings)
        assert got == want
        assert spec.released and spec.draft._ctx is None and spec.losses >= 2
        assert result.stats.drafted_tokens < 12  # two short probes, then never again
        assert streamer.sets.streamed_bytes < before  # applied by the prefetch thread at a token boundary
        again, result = _run(eng, [Message("user", PROMPTS[0])], settings)  # later replies run plain
        assert again == want and result.stats.drafted_tokens == 0
    finally:
        eng.close()
    assert spec.draft._ctx is None


def test_a_useless_draft_is_kept_when_the_target_does_not_stream(target: LlamaEngine,
                                                                  models: dict[str, Path]) -> None:
    spec = target.speculator = Speculator(target, load_engine(models["other"], plan=cpu_plan()))
    try:
        _run(target, [Message("user", PROMPTS[0])], replace(GREEDY, max_tokens=200))
        assert not spec.released and spec.draft._ctx is not None  # off, but re-tried later: its memory is cheap
    finally:
        spec.close()
        target.speculator = None
