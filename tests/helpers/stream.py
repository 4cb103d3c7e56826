"""Streaming units for tests: layers of given sizes, back to back in one file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from corral.app.runtime.stream_units import Span, Unit


def units_of_sizes(sizes: Sequence[int], indices: Sequence[int] | None = None) -> list[Unit]:
    """Units laid out in the file in the order given; `indices`: their layer numbers (default 0, 1, 2, ...; a
    Llama GGUF's file order is blk.0, blk.1, blk.10, ...). Returned in layer order."""
    f, at, out = Path("/m.gguf"), 0, []
    for i, n in zip(range(len(sizes)) if indices is None else indices, sizes):
        out.append(Unit(i, (Span(f, at, at + n),)))
        at += n
    return sorted(out, key=lambda u: u.index)
