"""Long string arrays of a GGUF header (a vocabulary, its merges), kept as the header's own bytes.

A Llama 3 header holds 128,256 token strings and 280,147 merges. As Python lists they take ~38 MiB of the
process's heap for as long as the header is cached, and every running engine keeps its model's header: memory
that then cannot hold weights (where weights stream from disk, every MiB of it is a MiB more read per token).
`PackedStrings` keeps the array's stretch of the header as one `bytes` object (each string behind its 8-byte
length, exactly as the file has it) and where each string starts: ~9 MiB for the same two arrays. A string is
decoded when it is read.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator, Sequence
from typing import overload

_LENGTH = struct.Struct("<Q")


class PackedStrings(Sequence[str]):
    """A read-only sequence of strings over a GGUF string array's bytes."""

    __slots__ = ("_blob", "_starts")

    def __init__(self, blob: bytes, starts: array) -> None:
        """`blob`: the array's bytes, each string preceded by its little-endian u64 length (already checked to fit);
        `starts`: where each string's bytes begin in `blob`."""
        self._blob, self._starts = blob, starts

    def __len__(self) -> int:
        return len(self._starts)

    def _at(self, start: int) -> str:
        (length,) = _LENGTH.unpack_from(self._blob, start - 8)
        return self._blob[start : start + length].decode("utf-8", errors="replace")

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self._at(s) for s in self._starts[index]]
        return self._at(self._starts[index])

    def __iter__(self) -> Iterator[str]:
        return (self._at(s) for s in self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # equal to a list of the same strings, which has none

    def __repr__(self) -> str:
        return f"PackedStrings({len(self)} strings)"

    @property
    def nbytes(self) -> int:
        """What it holds: the header's bytes and the start offsets."""
        return len(self._blob) + self._starts.itemsize * len(self._starts)


def pack(buf: bytes | memoryview, first: int, end: int, starts: Sequence[int]) -> PackedStrings:
    """The strings of `buf[first:end]` (length-prefixed, starting at the absolute `starts`) as PackedStrings."""
    code = "I" if end - first < 1 << 32 else "Q"
    return PackedStrings(bytes(buf[first:end]), array(code, (s - first for s in starts)))


__all__ = ["PackedStrings", "pack"]
