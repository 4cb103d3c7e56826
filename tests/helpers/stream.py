"""Streaming units for tests: layers of given sizes, back to back in one file."""

from __future__ import annotations

from pathlib import Path

from corral.app.runtime.stream_units import Span, Unit


def units_of_sizes(sizes: list[int]) -> list[Unit]:
    f, at, out = Path("/m.gguf"), 0, []
    for i, n in enumerate(sizes):
        out.append(Unit(i, (Span(f, at, at + n),)))
        at += n
    return out
