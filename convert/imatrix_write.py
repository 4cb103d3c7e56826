"""Write importance matrices the way llama.cpp's `llama-imatrix` does: GGUF, or the legacy `.dat` on request.

GGUF (tools/imatrix/imatrix.cpp `save_imatrix`): metadata `general.type = "imatrix"`, `imatrix.datasets`
(array of strings), `imatrix.chunk_count` and `imatrix.chunk_size` (u32), then per weight tensor, in sorted name
order, `<name>.in_sum2` (F32, ne = [columns, n_mat]: the raw sums of squared activations) and `<name>.counts`
(F32, ne = [1, n_mat]: how many activation rows each sum holds); ggml stores a trailing dimension of 1 as no
dimension, so a dense weight's are 1-D. GGUF v3, 32-byte alignment.

Legacy `.dat` (`save_imatrix_legacy`): int32 entry count; per entry (sorted, entries without any data left out)
int32 name length, name, int32 ncall = ceil(max count / chunk size), int32 nval, float32 values = sum / count *
ncall (1 * ncall where a count is 0); then int32 chunk count, int32 dataset length, dataset.

Both are written atomically (temporary file beside the target, fsync, rename).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFType, GGUFValueType, Keys

from .atomic import atomic_output, check_output_path
from .errors import UsageError
from .gguf_writer import GGUFStreamWriter
from .imatrix import COUNT_SUFFIX, SUM_SUFFIX
from .tensor_specs import TensorSpec


@dataclass(frozen=True)
class ImatrixEntry:
    """One weight tensor's statistics: `sums` [n_mat, columns] of squared inputs, `counts` [n_mat] rows seen."""

    sums: np.ndarray = field(repr=False)
    counts: np.ndarray

    def __post_init__(self) -> None:
        if self.sums.ndim != 2 or self.counts.shape != (self.sums.shape[0],):
            raise ValueError(f"sums {self.sums.shape} and counts {self.counts.shape} do not match")


@dataclass(frozen=True)
class ImatrixData:
    """What an importance-matrix file holds."""

    entries: Mapping[str, ImatrixEntry]
    chunk_count: int  # complete chunks the sums cover
    chunk_size: int  # tokens per chunk
    datasets: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return self.chunk_count * self.chunk_size


def is_legacy_path(path: str | Path) -> bool:
    """llama.cpp's convention: a `.dat` output gets the legacy format, anything else GGUF."""
    return Path(path).suffix.lower() == ".dat"


def write_imatrix(path: str | Path, data: ImatrixData, *, force: bool = False, legacy: bool | None = None) -> Path:
    """Write `data` to `path` (legacy `.dat` when `legacy`, or by default when the name ends in .dat)."""
    if not data.entries:
        raise UsageError("no importance-matrix data to write (no weight matrix saw any activations)")
    if not data.datasets:
        raise UsageError("an importance matrix names the text it was computed on (no dataset given)")
    target = Path(path)
    if legacy if legacy is not None else is_legacy_path(target):
        return _write_legacy(target, data, force)
    return _write_gguf(target, data, force)


def _write_gguf(target: Path, data: ImatrixData, force: bool) -> Path:
    kvs = [
        (Keys.General.TYPE, GGUFType.IMATRIX, GGUFValueType.STRING),
        (Keys.IMatrix.DATASETS, list(data.datasets), GGUFValueType.ARRAY),
        (Keys.IMatrix.CHUNK_COUNT, int(data.chunk_count), GGUFValueType.UINT32),
        (Keys.IMatrix.CHUNK_SIZE, int(data.chunk_size), GGUFValueType.UINT32),
    ]
    arrays: list[tuple[TensorSpec, np.ndarray]] = []
    f32 = GGMLQuantizationType.F32
    for name in sorted(data.entries):
        entry = data.entries[name]
        n_mat, columns = entry.sums.shape
        arrays.append((TensorSpec(name + SUM_SUFFIX, _dims(columns, n_mat), f32),
                       np.ascontiguousarray(entry.sums, dtype="<f4")))
        arrays.append((TensorSpec(name + COUNT_SUFFIX, _dims(1, n_mat), f32),
                       np.ascontiguousarray(entry.counts, dtype="<f4")))
    with GGUFStreamWriter(target, kvs, [spec for spec, _ in arrays], force=force) as writer:
        for spec, values in arrays:
            writer.begin_tensor(spec.name)
            writer.write(values)
            writer.end_tensor()
    return target


def _dims(ne0: int, ne1: int) -> tuple[int, ...]:
    """GGUF dims as ggml writes a 2-D tensor: trailing dimensions of 1 dropped (ggml_n_dims)."""
    return (ne0,) if ne1 == 1 else (ne0, ne1)


def legacy_bytes(data: ImatrixData) -> bytes:
    """The legacy `.dat` image of `data`."""
    chunk_size = max(1, int(data.chunk_size))
    parts: list[bytes] = []
    stored = 0
    for name in sorted(data.entries):
        entry = data.entries[name]
        counts = np.asarray(entry.counts, dtype=np.int64)
        if not counts.any():
            continue  # llama.cpp skips entries with no data at all
        ncall = int((counts.max() + chunk_size - 1) // chunk_size)
        sums = np.asarray(entry.sums, dtype=np.float32)
        per_count = counts.astype(np.float32)[:, None]
        values = np.where(per_count == 0, np.float32(1), sums / np.where(per_count == 0, 1, per_count))
        values = (values.astype(np.float32) * np.float32(ncall)).astype("<f4").reshape(-1)
        raw = name.encode("utf-8")
        parts.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size) + values.tobytes())
        stored += 1
    dataset = (data.datasets[-1] if data.datasets else "").encode("utf-8")
    trailer = struct.pack("<i", int(data.chunk_count)) + struct.pack("<i", len(dataset)) + dataset
    return struct.pack("<i", stored) + b"".join(parts) + trailer


def _write_legacy(target: Path, data: ImatrixData, force: bool) -> Path:
    blob = legacy_bytes(data)
    check_output_path(target, force=force)
    with atomic_output(target) as tmp:
        tmp.write_bytes(blob)
    return target
