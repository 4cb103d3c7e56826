"""HF Llama checkpoint -> GGUF, streaming tensor by tensor with bounded memory.

Public API:
- `convert_checkpoint(src, out, outtype=, split_max_size=, force=, progress=) -> ConvertResult`
- `open_checkpoint(src) -> Checkpoint` (re-exported from hf_checkpoint)
- `gguf_metadata(ckpt, outtype="auto") -> list[(key, value, GGUFValueType)]`: exactly the KV pairs written.
- `plan_tensors(ckpt, outtype) -> list[OutputTensor]`: every output tensor (name, GGUF shape, type, bytes) in order.
- `iter_tensor_chunks(ckpt, plan) -> Iterator[np.ndarray | FileRange]`: one tensor's output bytes in
  row chunks of at most CHUNK_ELEMENTS values (bounded memory even for 405B embeddings).
- `iter_gguf_tensors(ckpt, outtype) -> Iterator[GGUFTensorOut]`: whole tensors, one at a time, in
  output order; `GGUFTensorOut.as_float32()` gives float32 values. Use outtype="f32" to get the
  unrounded float32 weights (what a quantizer wants).
Write your own GGUF from these with `gguf_writer.GGUFStreamWriter`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType

from . import llama_family as lf
from .encode import encode_rows_parallel
from .errors import InvalidConfig, InvalidSafetensors, UsageError
from .fp8 import dequantize_rows
from .gguf_writer import KV, GGUFStreamWriter
from .hf_checkpoint import IGNORED_SUFFIXES, Checkpoint, open_checkpoint, sampling_kvs
from .progress import ProgressFn
from .safetensors_io import NUMPY_STORAGE, SafetensorsTensor, bf16_bits_to_float32, to_float32
from .tensor_specs import TensorSpec
from .vocab import vocab_kvs

__all__ = [
    "CHUNK_ELEMENTS", "Checkpoint", "ConvertResult", "FileRange", "GGUFTensorOut", "OutputTensor",
    "convert_checkpoint", "gguf_metadata", "iter_gguf_tensors", "iter_tensor_chunks", "open_checkpoint",
    "plan_tensors", "resolve_ftype",
]  # fmt: skip

# Values per processing chunk: 4M values = 8 MiB of BF16 in, 16 MiB of float32 in flight. Peak
# memory is the interpreter + vocabulary (~150 MiB) plus a few buffers of this size, whatever the model.
CHUNK_ELEMENTS = 4 * 1024 * 1024
_SAME_BYTES = {
    ("BF16", GGMLQuantizationType.BF16),
    ("F16", GGMLQuantizationType.F16),
    ("F32", GGMLQuantizationType.F32),
}


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote."""

    paths: tuple[Path, ...]
    bytes_written: int
    n_tensors: int
    seconds: float
    outtype: str


@dataclass(frozen=True)
class FileRange:
    """Bytes to move unchanged from a source file (no decode, no copy through Python)."""

    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the converted file: where its data comes from and how it is transformed."""

    name: str
    shape: tuple[int, ...]  # torch order (rows first)
    ggml_type: GGMLQuantizationType
    src: SafetensorsTensor | None  # None: generated (rope_freqs)
    scale: SafetensorsTensor | None = None  # FP8 per-row scales
    permute_groups: int | None = None
    generated: Any = None  # np.ndarray for generated tensors

    @property
    def shape_gguf(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @cached_property
    def spec(self) -> TensorSpec:
        """The GGUF tensor this plan writes."""
        return TensorSpec(self.name, self.shape_gguf, self.ggml_type)

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes


@dataclass(frozen=True)
class GGUFTensorOut:
    """A whole output tensor: GGUF name, GGUF-order shape, type and data bytes (uint8/typed array)."""

    name: str
    shape_gguf: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    data: np.ndarray

    def as_float32(self) -> np.ndarray:
        """The tensor's values as float32, torch-order shape (rows first)."""
        from gguf import quants

        shape = tuple(reversed(self.shape_gguf))
        raw = np.ascontiguousarray(self.data).view(np.uint8)
        if self.ggml_type == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape)
        if self.ggml_type == GGMLQuantizationType.F16:
            return raw.view(np.float16).astype(np.float32).reshape(shape)
        if self.ggml_type == GGMLQuantizationType.BF16:
            return bf16_bits_to_float32(raw.view(np.uint16)).reshape(shape)
        return np.asarray(quants.dequantize(raw.reshape(shape[0], -1), self.ggml_type), dtype=np.float32).reshape(shape)


# ----------------------------------------------------------------------------- planning


def resolve_ftype(ckpt: Checkpoint, outtype: str) -> LlamaFileType:
    """--outtype -> file type; 'auto' follows the first matrix (bf16 -> BF16, f16 -> F16, else F16) like llama.cpp."""
    key = outtype.lower()
    if key in lf.OUTTYPES:
        return lf.OUTTYPES[key]
    if key != "auto":
        raise UsageError(f"unknown outtype {outtype!r} (choose from {', '.join([*lf.OUTTYPES, 'auto'])})")
    first = ckpt.first_matrix_dtype()
    if first == "BF16" or ckpt.config.fp8:
        return LlamaFileType.MOSTLY_BF16
    return LlamaFileType.MOSTLY_F16


def _ftype(ckpt: Checkpoint, outtype: str | LlamaFileType) -> LlamaFileType:
    return outtype if isinstance(outtype, LlamaFileType) else resolve_ftype(ckpt, outtype)


def plan_tensors(ckpt: Checkpoint, outtype: str | LlamaFileType = "auto") -> list[OutputTensor]:
    """Validate the checkpoint's tensors against config.json and plan every output tensor, in order."""
    cfg = ckpt.config
    hp = cfg.hparams
    ftype = _ftype(ckpt, outtype)
    plans: list[OutputTensor] = []
    if hp.rope_scaling is not None:
        factors = lf.rope_freq_factors(hp.head_dim, hp.rope_theta, hp.rope_scaling)
        plans.append(OutputTensor(lf.ROPE_FREQS_NAME, factors.shape, GGMLQuantizationType.F32, None, generated=factors))
    seen: set[str] = set()
    for name, info in ckpt.tensors.items():
        if name.endswith(IGNORED_SUFFIXES) or name.endswith(".weight_scale"):
            continue
        where = info.file
        new_name = lf.gguf_name(name, hp.n_layer)
        shape = lf.expected_shape(name, hp)
        if new_name is None or shape is None:
            raise InvalidConfig(f"unexpected tensor {name!r} for a {hp.n_layer}-layer Llama", path=where)
        if info.shape != shape:
            raise InvalidSafetensors(f"tensor {name!r} has shape {list(info.shape)}, config.json implies {list(shape)}", path=where)
        scale = None
        if info.dtype == "F8_E4M3":
            if not cfg.fp8:
                raise InvalidConfig(f"tensor {name!r} is FP8 but config.json has no fbgemm_fp8 quantization_config", path=where)
            scale = ckpt.tensors.get(name + "_scale")
            if scale is None:
                raise InvalidSafetensors(f"FP8 tensor {name!r} has no {name}_scale", path=where)
            if math.prod(scale.shape) != shape[0] or scale.dtype not in ("F32", "BF16", "F16"):
                raise InvalidSafetensors(f"{name}_scale must be a float [{shape[0]}, 1] tensor", path=scale.file)
        elif info.dtype not in ("BF16", "F16", "F32"):
            raise InvalidSafetensors(f"tensor {name!r} has dtype {info.dtype}; expected BF16, F16 or F32", path=where)
        qtype = lf.tensor_type(new_name, shape, ftype)
        plans.append(OutputTensor(new_name, shape, qtype, info, scale, lf.permute_heads(name, hp)))
        seen.add(name)
    required = lf.required_hf_tensors(hp)
    missing = [n for n in required if n not in seen]
    if missing:
        raise InvalidConfig(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]!r}", path=ckpt.folder)
    return plans


def _param_count(plans: list[OutputTensor]) -> int:
    return sum(math.prod(p.shape) for p in plans)


def _size_label(plans: list[OutputTensor]) -> str | None:
    try:
        from gguf.utility import size_label

        return size_label(_param_count(plans), _param_count(plans), 0, 0)
    except Exception:  # pragma: no cover - provenance only
        return None


def gguf_metadata(ckpt: Checkpoint, outtype: str | LlamaFileType = "auto", plans: list[OutputTensor] | None = None) -> list[KV]:
    """Every GGUF key/value pair of the output file, in llama.cpp's order (no split.* keys)."""
    hp = ckpt.config.hparams
    ftype = _ftype(ckpt, outtype)
    plans = plans if plans is not None else plan_tensors(ckpt, ftype)
    arch = lf.ARCH_NAME
    u32, f32, s = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    kvs: list[KV] = [
        (Keys.General.ARCHITECTURE, arch, s),
        (Keys.General.TYPE, "model", s),
    ]
    kvs += sampling_kvs(ckpt.folder)
    kvs.append((Keys.General.NAME, ckpt.folder.resolve().name or "model", s))
    label = _size_label(plans)
    if label:
        kvs.append((Keys.General.SIZE_LABEL, label, s))
    kvs += [
        (Keys.LLM.BLOCK_COUNT.format(arch=arch), hp.n_layer, u32),
        (Keys.LLM.CONTEXT_LENGTH.format(arch=arch), hp.n_ctx_train, u32),
        (Keys.LLM.EMBEDDING_LENGTH.format(arch=arch), hp.n_embd, u32),
        (Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), hp.n_ff, u32),
        (Keys.Attention.HEAD_COUNT.format(arch=arch), hp.n_head, u32),
        (Keys.Attention.HEAD_COUNT_KV.format(arch=arch), hp.n_head_kv, u32),
        (Keys.Rope.FREQ_BASE.format(arch=arch), hp.rope_theta, f32),
        (Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch), hp.rms_eps, f32),
        (Keys.Attention.KEY_LENGTH.format(arch=arch), hp.head_dim, u32),
        (Keys.Attention.VALUE_LENGTH.format(arch=arch), hp.head_dim, u32),
        (Keys.General.FILE_TYPE, int(ftype), u32),
        (Keys.LLM.VOCAB_SIZE.format(arch=arch), hp.n_vocab, u32),
        (Keys.Rope.DIMENSION_COUNT.format(arch=arch), hp.head_dim, u32),
        (Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, u32),
    ]
    kvs += vocab_kvs(ckpt.folder, hp.n_vocab, ckpt.config.raw)
    return kvs


# ----------------------------------------------------------------------------- data


def _read_rows(fd: int, info: SafetensorsTensor, row0: int, row1: int) -> np.ndarray:
    """Rows [row0, row1) of a tensor, read with pread (no mapping stays resident)."""
    row_elems = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
    itemsize = NUMPY_STORAGE[info.dtype].itemsize
    start = info.start + row0 * row_elems * itemsize
    length = (row1 - row0) * row_elems * itemsize
    buf = bytearray(length)
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:]], start + done)
        if n <= 0:
            raise InvalidSafetensors(f"file ended inside tensor {info.name!r}", path=info.file)
        done += n
    arr = np.frombuffer(buf, dtype=NUMPY_STORAGE[info.dtype])
    return arr.reshape((row1 - row0, *info.shape[1:])) if len(info.shape) > 1 else arr


class _Fds:
    """Read-only file descriptors of the source files, opened on demand."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def get(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _rows_per_chunk(plan: OutputTensor, chunk_elements: int) -> int:
    rows = plan.shape[0]
    row_elems = max(1, math.prod(plan.shape[1:]))
    group = rows // plan.permute_groups if plan.permute_groups else 1
    per = max(1, chunk_elements // row_elems) // group * group
    return max(group, min(rows, per))


def iter_tensor_chunks(
    plan: OutputTensor, fds: _Fds | None = None, chunk_elements: int = CHUNK_ELEMENTS
) -> Iterator[np.ndarray | FileRange]:
    """The output bytes of one planned tensor as row chunks (arrays) or unchanged file ranges."""
    if plan.src is None:
        yield np.ascontiguousarray(plan.generated, dtype=np.float32)
        return
    src = plan.src
    if (src.dtype, plan.ggml_type) in _SAME_BYTES and not plan.permute_groups and plan.scale is None:
        yield FileRange(src.file, src.start, src.nbytes)
        return
    own = fds is None
    fds = fds or _Fds()
    try:
        rows = plan.shape[0] if len(plan.shape) > 1 else 1
        step = _rows_per_chunk(plan, chunk_elements) if len(plan.shape) > 1 else 1
        for row0 in range(0, rows, step):
            row1 = min(rows, row0 + step)
            if len(plan.shape) > 1:
                block = _read_rows(fds.get(src.file), src, row0, row1)
            else:
                block = _read_rows(fds.get(src.file), src, 0, src.shape[0])
            dtype = src.dtype
            if plan.permute_groups:
                block = lf.permute_rows(block, plan.permute_groups * (row1 - row0) // rows)
            if plan.scale is not None:
                scale = to_float32(_read_rows(fds.get(plan.scale.file), plan.scale, row0, row1), plan.scale.dtype)
                if plan.permute_groups:
                    scale = lf.permute_rows(scale.reshape(row1 - row0, -1), plan.permute_groups * (row1 - row0) // rows)
                block, dtype = dequantize_rows(block, scale), "F32"
            yield from encode_rows_parallel(block, dtype, plan.ggml_type)
    finally:
        if own:
            fds.close()


def iter_gguf_tensors(ckpt: Checkpoint, outtype: str | LlamaFileType = "auto") -> Iterator[GGUFTensorOut]:
    """Whole output tensors in file order, one at a time (memory: one tensor)."""
    fds = _Fds()
    try:
        for plan in plan_tensors(ckpt, outtype):
            parts: list[np.ndarray] = []
            for piece in iter_tensor_chunks(plan, fds):
                if isinstance(piece, FileRange):
                    parts.append(np.fromfile(piece.path, dtype=np.uint8, count=piece.length, offset=piece.offset))
                else:
                    parts.append(np.ascontiguousarray(piece).view(np.uint8).reshape(-1))
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            yield GGUFTensorOut(plan.name, plan.shape_gguf, plan.ggml_type, data)
    finally:
        fds.close()


# ----------------------------------------------------------------------------- convert


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    outtype: str = "auto",
    split_max_size: int | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> ConvertResult:
    """Convert an HF Llama checkpoint folder to GGUF at `out` (split into shards when `split_max_size`)."""
    t0 = time.monotonic()
    ckpt = open_checkpoint(src)
    ftype = resolve_ftype(ckpt, outtype)
    plans = plan_tensors(ckpt, ftype)
    kvs = gguf_metadata(ckpt, ftype, plans)
    fds = _Fds()
    try:
        with GGUFStreamWriter(
            out, kvs, [p.spec for p in plans], split_max_size=split_max_size, force=force, progress=progress
        ) as writer:
            for plan in plans:
                writer.begin_tensor(plan.name)
                for piece in iter_tensor_chunks(plan, fds):
                    if isinstance(piece, FileRange):
                        writer.copy_from(fds.get(piece.path), piece.offset, piece.length)
                    else:
                        writer.write(piece)
                writer.end_tensor()
    finally:
        fds.close()
    name = {v: k for k, v in lf.OUTTYPES.items()}[ftype]
    return ConvertResult(tuple(writer.paths), writer.total_bytes, len(plans), time.monotonic() - t0, name)
