"""Importance matrices: read llama.cpp's legacy `.dat` and GGUF imatrix files, validated.

Both formats store, per weight tensor, sums of squared activations per input column. llama.cpp's
quantizer wants the mean (tools/quantize/quantize.cpp `load_imatrix`): the legacy format divides by
`ncall`; the GGUF format (`<name>.in_sum2` + `<name>.counts`, one count per expert) divides each
expert's slice by its count, and a zero count gives weights of 1. We compute exactly that, in
float32, so the values handed to `llama_model_quantize` or `ggml_quantize_chunk` are the same.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys

from .errors import InputNotFound, InvalidFile

GGUF_MAGIC = b"GGUF"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
MAX_NAME_BYTES = 4096
WHERE_TO_GET = (
    "make one with `corral imatrix MODEL.gguf -o imatrix.gguf` (the model itself or its Q8_0; the same file "
    "llama.cpp's llama-imatrix writes), or download the `imatrix.dat`/`*.imatrix.gguf` published beside most "
    "GGUF quants on Hugging Face"
)


@dataclass(frozen=True)
class Imatrix:
    """Per-tensor importance weights (the mean squared activation of each input column)."""

    path: Path
    format: str  # "legacy" or "gguf"
    entries: dict[str, np.ndarray] = field(repr=False)  # name -> float32, ne0 * n_expert values
    chunk_count: int = 0
    datasets: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> np.ndarray | None:
        return self.entries.get(name)

    def for_tensor(self, name: str, ne0: int, n_mat: int = 1) -> np.ndarray | None:
        """The weights for a tensor with rows of `ne0` values (`n_mat` experts); None when absent."""
        values = self.entries.get(name)
        if values is None:
            return None
        if values.size != ne0 * n_mat:
            raise InvalidFile(
                f"importance matrix has {values.size} values for {name}, the tensor needs {ne0 * n_mat} "
                "(the imatrix was made for a different model)", path=self.path)
        return values


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a legacy `.dat` or GGUF imatrix file; raise InvalidFile on anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound("importance matrix file not found", path=path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    imatrix = _load_gguf(path) if magic == GGUF_MAGIC else _load_legacy(path)
    for name, values in imatrix.entries.items():
        if not np.all(np.isfinite(values)):
            raise InvalidFile(f"importance matrix has non-finite values for {name}", path=path)
    return imatrix


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise InvalidFile(f"not an importance matrix: truncated while reading {what}", path=path)
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    (n_entries,) = struct.unpack("<i", take(4, "the entry count"))
    if n_entries < 1 or n_entries * 16 > len(data):
        raise InvalidFile(f"not an importance matrix: bad entry count {n_entries}", path=path)
    entries: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        (name_len,) = struct.unpack("<i", take(4, f"entry {i + 1}'s name length"))
        if not 0 < name_len <= MAX_NAME_BYTES:
            raise InvalidFile(f"not an importance matrix: entry {i + 1} has a name of {name_len} bytes", path=path)
        try:
            name = take(name_len, f"entry {i + 1}'s name").decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidFile(f"not an importance matrix: entry {i + 1}'s name is not UTF-8", path=path) from None
        ncall, nval = struct.unpack("<ii", take(8, f"the sizes of {name}"))
        if nval < 1:
            raise InvalidFile(f"importance matrix entry {name} has {nval} values", path=path)
        if name in entries:
            raise InvalidFile(f"importance matrix has two entries for {name}", path=path)
        sums = np.frombuffer(take(4 * nval, f"the values of {name}"), dtype="<f4").astype(np.float32)
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums
    chunk_count = 0
    datasets: tuple[str, ...] = ()
    if len(data) - pos >= 4:  # optional trailer: chunk count, dataset name
        (chunk_count,) = struct.unpack("<i", take(4, "the chunk count"))
        if len(data) - pos >= 4:
            (ds_len,) = struct.unpack("<i", take(4, "the dataset name length"))
            if 0 < ds_len <= len(data) - pos:
                datasets = (take(ds_len, "the dataset name").decode("utf-8", "replace"),)
    return Imatrix(path, "legacy", entries, max(chunk_count, 0), datasets)


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct errors on malformed files
        raise InvalidFile(f"not a valid GGUF imatrix file: {exc}", path=path) from None
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name.endswith(SUM_SUFFIX):
            target, base = sums, name[: -len(SUM_SUFFIX)]
        elif name.endswith(COUNT_SUFFIX):
            target, base = counts, name[: -len(COUNT_SUFFIX)]
        else:
            continue
        if tensor.tensor_type != GGMLQuantizationType.F32:
            raise InvalidFile(f"imatrix tensor {name} must be F32, not {tensor.tensor_type.name}", path=path)
        target[base] = tensor
    if not sums:
        raise InvalidFile("no importance-matrix entries (*.in_sum2 tensors) in this GGUF file", path=path)
    entries: dict[str, np.ndarray] = {}
    for base in sorted(set(sums) | set(counts)):
        if base not in sums or base not in counts:
            raise InvalidFile(f"imatrix has sums without counts (or the reverse) for {base}", path=path)
        values = np.asarray(sums[base].data, dtype=np.float32).reshape(-1)
        n = np.asarray(counts[base].data, dtype=np.float32).reshape(-1)
        if n.size < 1 or values.size % n.size:
            raise InvalidFile(f"imatrix entry {base}: {values.size} sums do not split into {n.size} experts",
                              path=path)
        # counts are stored as floats and rounded to integers (common/imatrix-loader.cpp)
        n = np.rint(n).astype(np.float32)
        per = values.reshape(n.size, -1)
        mean = np.ones_like(per)
        nonzero = n > 0
        mean[nonzero] = per[nonzero] / n[nonzero, None]
        entries[base] = mean.reshape(-1)
    meta = {f.name: f for f in reader.fields.values()}
    chunk_count = _scalar(meta.get(Keys.IMatrix.CHUNK_COUNT))
    datasets = tuple(_strings(meta.get(Keys.IMatrix.DATASETS)))
    return Imatrix(path, "gguf", entries, int(chunk_count or 0), datasets)


def _scalar(field: Any) -> Any:
    if field is None or not field.data:
        return None
    return field.parts[field.data[0]][0].item()


def _strings(field: Any) -> list[str]:
    if field is None:
        return []
    try:
        return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
    except Exception:
        return []


class LlamaImatrixData:
    """A NULL-terminated `llama_model_imatrix_data` array that keeps its float buffers alive."""

    def __init__(self, imatrix: Imatrix, names: set[str] | None = None) -> None:
        import ctypes

        import llama_cpp

        chosen = [(n, v) for n, v in imatrix.entries.items() if names is None or n in names]
        self._buffers = [np.ascontiguousarray(v, dtype=np.float32) for _, v in chosen]
        self._names = [n.encode() for n, _ in chosen]
        array = (llama_cpp.llama_model_imatrix_data * (len(chosen) + 1))()
        float_p = ctypes.POINTER(ctypes.c_float)
        for i, (name, buf) in enumerate(zip(self._names, self._buffers)):
            array[i].name = name
            array[i].data = buf.ctypes.data_as(float_p)
            array[i].size = buf.size
        array[len(chosen)].name = None
        self.array = array
        self.count = len(chosen)
