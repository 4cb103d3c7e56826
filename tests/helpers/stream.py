"""Streaming for tests: units of given sizes back to back in one file, and the in-RAM greedy reference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corral.app.runtime.stream_units import Span, Unit
from tests.helpers.engine import cpu_plan


def units_of_sizes(sizes: Sequence[int], indices: Sequence[int] | None = None) -> list[Unit]:
    """Units laid out in the file in the order given; `indices`: their layer numbers (default 0, 1, 2, ...; a
    Llama GGUF's file order is blk.0, blk.1, blk.10, ...). Returned in layer order."""
    f, at, out = Path("/m.gguf"), 0, []
    for i, n in zip(range(len(sizes)) if indices is None else indices, sizes):
        out.append(Unit(i, (Span(f, at, at + n),)))
        at += n
    return sorted(out, key=lambda u: u.index)


def greedy_in_ram(model: Path, prompt: str, settings: Any) -> tuple[str, list[int]]:
    """The text and tokens a model writes with nothing streaming (the reference the streaming engine must match)."""
    from corral.app.runtime.engine import load_engine

    plain = load_engine(model, plan=cpu_plan(n_ctx=256))
    try:
        assert plain.streamer is None
        text = plain.complete(prompt, settings).text
        return text, list(plain.last_completion_tokens)
    finally:
        plain.close()
