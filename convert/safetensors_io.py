"""Safetensors: strict header validation, a zero-copy mmap reader and a small writer.

File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header size N,
N bytes of UTF-8 JSON (`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`),
then the data section. Offsets are relative to the data section start. We validate what the
safetensors library validates: header size cap, JSON object, known dtypes, byte counts matching
shapes, offsets sorted, contiguous, non-overlapping, and the last one ending exactly at EOF.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidSafetensors

# Same cap as the safetensors library (MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# numpy storage dtype for each safetensors dtype (BF16 and FP8 are kept as raw integers).
NUMPY_STORAGE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "F8_E4M3": np.dtype(np.uint8), "F8_E5M2": np.dtype(np.uint8),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "F64": np.dtype("<f8"),
}  # fmt: skip


@dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor's entry in a safetensors header (a source tensor, not a GGUF one); offsets are absolute."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in file order, user metadata, data section start."""

    path: Path
    tensors: dict[str, SafetensorsTensor]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _fail(path: Path, message: str) -> InvalidSafetensors:
    return InvalidSafetensors(f"invalid safetensors header: {message}", path=path)


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (JSON booleans are refused, though Python counts them as ints)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of one safetensors file (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _fail(path, "file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header size {n:,} exceeds the {MAX_HEADER_BYTES:,}-byte cap")
            if 8 + n > file_size:
                raise _fail(path, f"header size {n:,} runs past the end of the file ({file_size:,} bytes)")
            raw = fh.read(n)
    except FileNotFoundError as exc:
        raise InvalidSafetensors("file not found", path=path) from exc
    except IsADirectoryError as exc:
        raise InvalidSafetensors("is a directory, not a safetensors file", path=path) from exc
    return parse_header(path, raw, file_size)


def parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate header JSON bytes `raw` of a file of `file_size` bytes."""
    if not raw.startswith(b"{"):
        raise _fail(path, "header does not start with '{'")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"header is not valid UTF-8 JSON ({exc})") from exc
    except RecursionError as exc:  # json.loads recurses once per nesting level
        raise _fail(path, "header JSON is nested too deeply") from exc
    if not isinstance(doc, dict):
        raise _fail(path, "header is not a JSON object")
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise _fail(path, f"entry {name!r} is not an object")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _fail(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _fail(path, f"tensor {name!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _fail(path, f"tensor {name!r} has bad data_offsets {offsets!r}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise _fail(
                path,
                f"tensor {name!r}: {offsets[1] - offsets[0]:,} bytes for shape {shape} {dtype} (want {expected:,})",
            )
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    cursor = 0
    tensors: dict[str, SafetensorsTensor] = {}
    for begin, end, name, dtype, shape in entries:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise _fail(path, f"tensor {name!r} at offset {begin:,} {kind} (expected {cursor:,})")
        cursor = end
        tensors[name] = SafetensorsTensor(name, dtype, shape, data_start + begin, data_start + end, path)
    if cursor != data_len:
        where = "past the end of the file" if cursor > data_len else "before the end of the file"
        raise _fail(path, f"tensor data ends at {cursor:,}, {where} (data section is {data_len:,} bytes)")
    return SafetensorsHeader(path, tensors, dict(metadata), data_start, file_size)


class SafetensorsFile:
    """A read-only mmap of a validated safetensors file; tensors are zero-copy numpy views."""

    def __init__(self, path: str | Path) -> None:
        self.header = read_header(path)
        self.path = self.header.path
        self._fh = open(self.path, "rb")
        self._mm: mmap.mmap | None = None
        if self.header.file_size > 0:
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)

    @property
    def tensors(self) -> dict[str, SafetensorsTensor]:
        return self.header.tensors

    def fileno(self) -> int:
        return self._fh.fileno()

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes as a memoryview into the mapping (no copy)."""
        info = self.header.tensors[name]
        if self._mm is None or info.nbytes == 0:
            return memoryview(b"")
        return memoryview(self._mm)[info.start : info.end]

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view (BF16/FP8 as raw uint16/uint8)."""
        info = self.header.tensors[name]
        dtype = NUMPY_STORAGE[info.dtype]
        if self._mm is None or info.nbytes == 0:
            return np.zeros(info.shape, dtype=dtype)
        arr = np.frombuffer(self._mm, dtype=dtype, count=info.n_elements, offset=info.start)
        return arr.reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (keeps resident memory bounded)."""
        info = self.header.tensors[name]
        if self._mm is None or info.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = info.start - info.start % page
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)
        except (OSError, ValueError):  # pragma: no cover - advisory only
            pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a numpy view still alive; the GC unmaps later
                pass
            self._mm = None
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- conversion helpers


def float32_to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN -> quiet NaN (like torch)."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    out = rounded.astype(np.uint16)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) & 0x8000) | 0x7FC0
    return out


def float32_to_bf16_bytes(arr: np.ndarray) -> bytes:
    """float32 array -> little-endian bfloat16 bytes, round to nearest even (like torch)."""
    return float32_to_bf16_bits(arr).astype("<u2").tobytes()


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    out = np.empty(np.shape(bits), dtype=np.uint32)
    np.copyto(out, np.asarray(bits, dtype=np.uint16), casting="safe")
    out <<= 16
    return out.view(np.float32)


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor view from `SafetensorsFile.array` -> float32 (exact for BF16/F16/F32/FP8)."""
    if dtype == "F32":
        return np.asarray(arr, dtype=np.float32)
    if dtype == "BF16":
        return bf16_bits_to_float32(arr)
    if dtype in ("F16", "F64"):
        return np.asarray(arr).astype(np.float32)
    if dtype == "F8_E4M3":
        from .fp8 import e4m3_to_float32

        return e4m3_to_float32(arr)
    raise InvalidSafetensors(f"cannot convert dtype {dtype} to float32")


# ---------------------------------------------------------------- writer


def _as_bytes(dtype: str, shape: tuple[int, ...], data: Any) -> bytes | memoryview:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).tobytes()
    return memoryview(data).cast("B")


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, tuple[str, tuple[int, ...], Any]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file from {name: (dtype_str, shape, bytes | np.ndarray)} in the given order."""
    path = Path(path)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    payloads: list[bytes | memoryview] = []
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown safetensors dtype {dtype!r}")
        buf = _as_bytes(dtype, tuple(shape), data)
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if len(buf) != expected:
            raise ValueError(f"{name}: {len(buf)} bytes given for shape {tuple(shape)} {dtype} (want {expected})")
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + len(buf)]}
        payloads.append(buf)
        offset += len(buf)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the safetensors library pads the header to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for buf in payloads:
            fh.write(buf)

