"""Low-disk path: Hugging Face folder -> quantized GGUF, tensor by tensor, never storing a BF16 GGUF.

Each tensor comes from the converter's streaming API exactly as `corral convert --outtype bf16` would
write it (renamed, q/k permuted, rounded to BF16, 1-D tensors F32), is widened to float32 the way
llama.cpp does (`ggml_bf16_to_fp32_row`, an exact shift), gets the type llama.cpp's quantizer would
pick (`quant_rules`) and is quantized by ggml's own `ggml_quantize_chunk` (`ggml_lib`), with the same
importance weights. Header, key order and tensor order follow `llama_model_quantize`, so the file is
byte-identical to `convert bf16` followed by `llama_model_quantize`.

Disk: the two-step path needs the BF16 GGUF (2 bytes/weight; ~812 GB for 405B) *plus* the quantized
output; this path needs only the output (e.g. ~150 GB for 405B at Q2_K). Memory: one source chunk
(<= 16M values, 64 MiB as float32) plus its quantized bytes, per worker thread.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType

from . import quant_rules, quant_types
from .converter import (
    FileRange,
    OutputTensor,
    gguf_metadata,
    iter_tensor_chunks,
    open_checkpoint,
    plan_tensors,
)
from .errors import EngineError, ImatrixRequired, InvalidFile
from .ggml_lib import ggml
from .gguf_writer import KV, GGUFStreamWriter
from .imatrix import WHERE_TO_GET, Imatrix, load_imatrix
from .progress import ProgressFn, no_progress
from .quantize import imatrix_kv_overrides
from .safetensors_io import bf16_bits_to_float32
from .tensor_specs import TensorSpec, tensor_nbytes

T = GGMLQuantizationType
_PASS_THROUGH = frozenset({T.F32, T.F16, T.BF16})


@dataclass(frozen=True)
class StreamQuantizeResult:
    """What convert_quantized wrote."""

    path: Path
    ftype: str
    bytes_written: int
    n_tensors: int
    seconds: float
    types: dict[str, str]


def quantize_rows(values: np.ndarray, ggml_type: GGMLQuantizationType, imatrix: np.ndarray | None = None,
                  *, threads: int = 1) -> np.ndarray:
    """Quantize float32 rows (n_rows x n_per_row) with ggml_quantize_chunk; returns the bytes."""
    lib = ggml()
    rows = np.ascontiguousarray(values, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    row_bytes = tensor_nbytes((n_per_row,), ggml_type)
    out = np.empty(n_rows * row_bytes, dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if lib.ggml_quantize_requires_imatrix(int(ggml_type)) and weights is None:
        raise ImatrixRequired(f"{ggml_type.name} needs an importance matrix: {WHERE_TO_GET}")
    w_ptr = weights.ctypes.data if weights is not None else None
    base = rows.ctypes.data
    dst = out.ctypes.data

    def run(r0: int, r1: int) -> int:
        src = base + r0 * n_per_row * 4
        return lib.ggml_quantize_chunk(int(ggml_type), src, dst + r0 * row_bytes, 0, r1 - r0, n_per_row, w_ptr)

    step = max(1, math.ceil(n_rows / max(1, threads)))
    spans = [(r, min(n_rows, r + step)) for r in range(0, n_rows, step)]
    if len(spans) == 1:
        done = run(*spans[0])
    else:
        with ThreadPoolExecutor(len(spans)) as pool:  # ctypes releases the GIL during the call
            done = sum(pool.map(lambda s: run(*s), spans))
    if done != out.size or not lib.ggml_validate_row_data(int(ggml_type), dst, out.size):
        raise EngineError(f"ggml produced invalid {ggml_type.name} data")
    return out


def _as_float32(piece: np.ndarray | FileRange, n_per_row: int) -> np.ndarray:
    """A chunk from the converter (BF16 bits, F16 or float32 values, or a file range) as float32 rows."""
    if isinstance(piece, FileRange):
        raw = np.fromfile(piece.path, dtype=np.uint16, count=piece.length // 2, offset=piece.offset)
    else:
        raw = np.ascontiguousarray(piece)
    if raw.dtype == np.uint16:  # BF16 bits: widening is an exact 16-bit shift
        f = bf16_bits_to_float32(raw)
    else:
        f = raw.astype(np.float32, copy=False)
    return f.reshape(-1, n_per_row)


def output_kvs(kvs: list[KV], ftype: LlamaFileType, imatrix: Imatrix | None) -> list[KV]:
    """The key/values llama_model_quantize writes: input keys, then quantization version and file type."""
    drop = {Keys.General.QUANTIZATION_VERSION, Keys.General.FILE_TYPE, Keys.Split.LLM_KV_SPLIT_NO,
            Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT}
    out = [kv for kv in kvs if kv[0] not in drop]
    out += [(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, GGUFValueType.UINT32),
            (Keys.General.FILE_TYPE, int(ftype), GGUFValueType.UINT32)]
    for key, value in imatrix_kv_overrides(imatrix):
        out = [kv for kv in out if kv[0] != key]
        vtype = GGUFValueType.STRING if isinstance(value, str) else GGUFValueType.UINT32
        out.append((key, value, vtype))
    return out


def convert_quantized(
    src: str | Path,
    out: str | Path,
    *,
    ftype: str,
    imatrix: str | Path | Imatrix | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    threads: int = 0,
) -> StreamQuantizeResult:
    """HF checkpoint folder -> quantized GGUF at `out`, streaming (no BF16 GGUF on disk)."""
    t0 = time.monotonic()
    info = quant_types.file_type(ftype)
    imat = load_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    ckpt = open_checkpoint(src)
    llama = ckpt.config.hparams
    plans = plan_tensors(ckpt, "bf16")
    kvs = output_kvs(gguf_metadata(ckpt, "bf16", plans), info.ftype, imat)
    by_name = {p.name: p for p in plans}
    specs = quant_rules.llama_cpp_order([p.spec for p in plans])
    hp = quant_rules.ModelHParams(n_layer=llama.n_layer, n_head=llama.n_head, n_head_kv=llama.n_head_kv)
    types = quant_rules.target_types(specs, info.ftype, has_imatrix=imat is not None, hparams=hp)
    needing = [s.name for s in specs if s.ggml_type != types[s.name]
               and quant_rules.allows_quantization(s) and quant_rules.requires_imatrix(s.name, types[s.name], info.ftype)]
    if needing and imat is None:
        raise ImatrixRequired(f"{info.name} needs an importance matrix (--imatrix FILE, a .dat or .gguf imatrix "
                              f"for this model): {WHERE_TO_GET}")
    weights = {s.name: _imatrix_for(imat, s, types[s.name], info.ftype) for s in specs if s.ggml_type != types[s.name]}
    out_specs = [TensorSpec(s.name, s.shape, types[s.name]) for s in specs]
    n_threads = threads if threads > 0 else (os.cpu_count() or 1)
    for t in {types[s.name] for s in specs}:
        if t not in _PASS_THROUGH:
            ggml().ggml_quantize_init(int(t))
    report = progress or no_progress
    with GGUFStreamWriter(out, kvs, out_specs, force=force) as writer:
        for i, spec in enumerate(out_specs):
            writer.begin_tensor(spec.name)
            for chunk in _tensor_bytes(by_name[spec.name], spec, weights.get(spec.name), n_threads):
                writer.write(chunk)
            writer.end_tensor()
            report(i + 1, len(out_specs), spec.name)
        total = writer.total_bytes
    return StreamQuantizeResult(Path(out), info.name, total, len(out_specs), time.monotonic() - t0,
                                {s.name: s.ggml_type.name for s in out_specs})


def _imatrix_for(imat: Imatrix | None, spec: TensorSpec, target: T, ftype: LlamaFileType
                 ) -> np.ndarray | None:
    """The row weights llama_model_quantize would pass for this tensor (or fail as it would)."""
    if imat is None:
        return None
    values = imat.get(spec.name)
    n_mat = spec.shape[2] if len(spec.shape) > 2 else 1
    if values is not None and values.size != spec.shape[0] * n_mat:
        if spec.name == "token_embd.weight":
            values = None  # llama.cpp ignores a wrong-sized token_embd entry
        else:
            raise InvalidFile(f"importance matrix has {values.size} values for {spec.name}, the tensor needs "
                              f"{spec.shape[0] * n_mat} (is it for this model?)", path=imat.path)
    if values is None and quant_rules.requires_imatrix(spec.name, target, ftype):
        raise ImatrixRequired(f"the importance matrix has no entry for {spec.name} (is it for this model?)",
                              path=imat.path)
    return values


def _tensor_bytes(plan: OutputTensor, spec: TensorSpec, weights: np.ndarray | None, threads: int) -> Iterator[np.ndarray]:
    """The output bytes of one tensor: unchanged BF16/F32 pieces, or ggml-quantized row chunks."""
    target = spec.ggml_type
    if target == plan.ggml_type:
        for piece in iter_tensor_chunks(plan):
            if isinstance(piece, FileRange):
                yield np.fromfile(piece.path, dtype=np.uint8, count=piece.length, offset=piece.offset)
            else:
                yield np.ascontiguousarray(piece).view(np.uint8).reshape(-1)
        return
    n_per_row = spec.shape[0]
    for piece in iter_tensor_chunks(plan):
        # ggml_quantize_chunk also does the F16 fallback llama.cpp uses for odd row lengths
        yield quantize_rows(_as_float32(piece, n_per_row), target, weights, threads=threads)
