"""Quantize a GGUF with llama.cpp's own `llama_model_quantize`, stoppable, atomic, with a size preview.

This module plans (per-tensor types, exact output sizes) and drives the run: llama.cpp works in a
child process (`quantize_child`) that writes into a temporary file beside the target, renamed only
on success.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, Keys

from . import quant_rules, quant_types
from .atomic import atomic_output, check_free_space, check_output_path, fsync_path
from .errors import ImatrixRequired, UsageError
from .gguf_file import GGUFModelFile, read_gguf
from .gguf_writer import pad_to
from .imatrix import WHERE_TO_GET, Imatrix, load_imatrix
from .progress import ProgressFn, no_progress

# The runner lives in quantize_child; re-exported here, where callers have always found it.
from .quantize_child import llama_dry_run, parse_tensor_lines, run_child  # noqa: F401
from .tensor_specs import TensorSpec, tensor_nbytes

T = GGMLQuantizationType
_FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})
_SPLIT_KEYS = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
# llama-quantize records the imatrix it used in these keys (tools/quantize/quantize.cpp).
KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass(frozen=True)
class QuantizedTensor:
    """One tensor before and after quantization (types by name, GGUF-order shape)."""

    name: str
    shape: tuple[int, ...]
    type_in: str
    type_out: str
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class QuantizeResult:
    """What a quantization did (or, for a dry run, would do)."""

    input: tuple[str, ...]
    output: tuple[str, ...]
    ftype: str
    dry_run: bool
    input_bytes: int
    output_bytes: int
    tensors: tuple[QuantizedTensor, ...]
    imatrix: str | None = None
    requantized: bool = False
    seconds: float = 0.0
    bpw: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tensors"] = [asdict(t) for t in self.tensors]
        return data


# ---------------------------------------------------------------- exact output size


def _u32_kv_bytes(key: str) -> int:
    return 8 + len(key.encode()) + 4 + 4


def _str_kv_bytes(key: str, value: str) -> int:
    return 8 + len(key.encode()) + 4 + 8 + len(value.encode())


def imatrix_kv_overrides(imatrix: Imatrix | None) -> list[tuple[str, str | int]]:
    """The keys llama-quantize adds to record the imatrix (values cut to 127 bytes as it does)."""
    if imatrix is None:
        return []
    out: list[tuple[str, str | int]] = [(KEY_IMATRIX_FILE, str(imatrix.path)[:127])]
    if imatrix.datasets:
        out.append((KEY_IMATRIX_DATASET, imatrix.datasets[0][:127]))
    out.append((KEY_IMATRIX_ENTRIES, len(imatrix)))
    if imatrix.chunk_count > 0:
        out.append((KEY_IMATRIX_CHUNKS, imatrix.chunk_count))
    return out


def output_kv_bytes(model: GGUFModelFile, overrides: list[tuple[str, str | int]], *, shard: int = 0,
                    n_shards: int = 1) -> int:
    """Header + key/value bytes of the quantized file llama.cpp writes (or of one of its shards)."""
    header = 24
    extra: dict[str, int] = {}
    if n_shards > 1:
        extra = {Keys.Split.LLM_KV_SPLIT_NO: 8 + len("split.no") + 4 + 2,
                 Keys.Split.LLM_KV_SPLIT_COUNT: 8 + len("split.count") + 4 + 2,
                 Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT: 8 + len("split.tensors.count") + 4 + 4}
    if shard > 0:
        return header + sum(extra.values())
    sizes = dict(model.headers[0].kv_bytes)
    for key in (*_SPLIT_KEYS, Keys.General.QUANTIZATION_VERSION, Keys.General.FILE_TYPE):
        sizes.pop(key, None)
    sizes[Keys.General.QUANTIZATION_VERSION] = _u32_kv_bytes(Keys.General.QUANTIZATION_VERSION)
    sizes[Keys.General.FILE_TYPE] = _u32_kv_bytes(Keys.General.FILE_TYPE)
    for key, value in overrides:
        sizes[key] = _str_kv_bytes(key, value) if isinstance(value, str) else _u32_kv_bytes(key)
    sizes.update(extra)
    return header + sum(sizes.values())


def _hparams(model: GGUFModelFile) -> quant_rules.ModelHParams:
    inferred = quant_rules.infer_hparams(model.tensors, model.architecture)

    def key(name: str, default: int) -> int:
        value = model.arch_key(name, default)
        return int(value[0] if isinstance(value, list) else value)

    return quant_rules.ModelHParams(
        n_layer=key(Keys.LLM.BLOCK_COUNT, inferred.n_layer),
        n_head=key(Keys.Attention.HEAD_COUNT, inferred.n_head),
        n_head_kv=key(Keys.Attention.HEAD_COUNT_KV, key(Keys.Attention.HEAD_COUNT, inferred.n_head_kv)),
        n_expert=key(Keys.LLM.EXPERT_COUNT, inferred.n_expert),
        arch=model.architecture,
    )


def plan_tensors(model: GGUFModelFile, ftype: str, *, has_imatrix: bool, keep_split: bool = False
                 ) -> list[QuantizedTensor]:
    """Per-tensor target types (quant_rules) in the order llama.cpp writes them."""
    specs: list[TensorSpec]
    if keep_split:
        index = {p: i for i, p in enumerate(model.files)}
        specs = sorted(model.tensors, key=lambda t: (index[t.file], t.offset))
    else:
        specs = quant_rules.llama_cpp_order(model.tensors)
    types = quant_rules.target_types(specs, ftype, has_imatrix=has_imatrix, hparams=_hparams(model),
                                     file_order=keep_split)
    return [QuantizedTensor(s.name, s.shape, s.ggml_type.name, types[s.name].name, s.nbytes,
                            tensor_nbytes(s.shape, types[s.name]))
            for s in specs]


def predict_output_bytes(model: GGUFModelFile, plans: list[QuantizedTensor], overrides: list[tuple[str, str | int]],
                         *, keep_split: bool = False) -> list[int]:
    """Exact size of each output file llama.cpp will write."""
    if not keep_split or len(model.files) == 1:
        groups = [plans]
    else:
        where = {t.name: model.files.index(t.file) for t in model.tensors}
        groups = [[p for p in plans if where[p.name] == i] for i in range(len(model.files))]
    n = len(groups)
    sizes = []
    for i, group in enumerate(groups):
        infos = sum(quant_rules.tensor_info_bytes(p.name, p.shape) for p in group)
        meta = output_kv_bytes(model, overrides, shard=i, n_shards=n) + infos
        sizes.append(pad_to(meta) + sum(pad_to(p.bytes_out) for p in group))
    return sizes


# ---------------------------------------------------------------- the run


def split_output_paths(out: Path, n: int) -> list[Path]:
    """llama.cpp's shard names for `out` (llama_split_path: PREFIX-00001-of-0000N.gguf)."""
    prefix = str(out)[:-5] if str(out).endswith(".gguf") else str(out)
    return [Path(f"{prefix}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def quantize_gguf(
    src: str | Path,
    out: str | Path,
    *,
    ftype: str,
    imatrix: str | Path | Imatrix | None = None,
    threads: int = 0,
    force: bool = False,
    dry_run: bool = False,
    keep_split: bool = False,
    allow_requantize: bool = False,
    progress: ProgressFn = no_progress,
) -> QuantizeResult:
    """Quantize `src` (a GGUF, or the first shard of a split) to `out` with llama.cpp's quantizer."""
    info = quant_types.file_type(ftype)
    model = read_gguf(src)
    imat = load_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    keep_split = keep_split and len(model.files) > 1
    quantized_in = sorted({t.ggml_type.name for t in model.tensors if t.ggml_type not in _FLOAT_TYPES})
    plans = plan_tensors(model, info.name, has_imatrix=imat is not None, keep_split=keep_split)
    requant = any(p.type_in != p.type_out and p.type_in in quantized_in for p in plans)
    if requant and not allow_requantize:
        raise UsageError(f"input is already quantized ({', '.join(quantized_in)}); requantizing loses quality "
                         "- quantize from the BF16/F16 GGUF, or pass --allow-requantize", path=src)
    needing = quant_rules.tensors_needing_imatrix(model.tensors, info.ftype, hparams=_hparams(model))
    if needing and imat is None and not dry_run:
        raise ImatrixRequired(
            f"{info.name} needs an importance matrix (--imatrix FILE, a .dat or .gguf imatrix for this model): "
            f"{WHERE_TO_GET}")
    if imat is not None and not dry_run:
        _check_imatrix_covers(imat, model, plans, info.name)
    if dry_run:
        plans = _apply_reported(plans, llama_dry_run(model.files[0], info.name, imatrix=imat.path if imat else None))
    overrides = imatrix_kv_overrides(imat)
    sizes = predict_output_bytes(model, plans, overrides, keep_split=keep_split)
    n_weights = sum(t.n_elements for t in model.tensors)
    out = Path(out)
    targets = split_output_paths(out, len(sizes)) if keep_split else [out]
    result = QuantizeResult(
        input=tuple(str(p) for p in model.files), output=tuple(str(p) for p in targets), ftype=info.name,
        dry_run=dry_run, input_bytes=model.file_bytes, output_bytes=sum(sizes), tensors=tuple(plans),
        imatrix=str(imat.path) if imat else None, requantized=requant,
        bpw=sum(p.bytes_out for p in plans) * 8 / max(n_weights, 1))
    if dry_run:
        return result
    for target in targets:
        check_output_path(target, force=force)
        if target.resolve() in {p.resolve() for p in model.files}:
            raise UsageError("output would overwrite the input", path=target)
    check_free_space(out.parent, sum(sizes))
    start = time.monotonic()
    job = {"src": str(model.files[0]), "ftype": int(info.ftype), "threads": int(threads),
           "imatrix": str(imat.path) if imat else None, "keep_split": keep_split,
           "allow_requantize": allow_requantize, "dry_run": False, "overrides": overrides,
           "target": str(out), "write_chunk_bytes": max((p.bytes_out for p in plans), default=0)}
    if keep_split:
        _run_split(job, out, targets, progress, len(plans))
    else:
        with atomic_output(out) as tmp:
            job["out"] = str(tmp)
            run_child(job, progress, len(plans))
    return replace(result, seconds=time.monotonic() - start, output_bytes=sum(p.stat().st_size for p in targets))


def _apply_reported(plans: list[QuantizedTensor], reported: dict[str, tuple[str, str]]) -> list[QuantizedTensor]:
    """Prefer the types llama.cpp's own dry run reports (they agree with quant_rules when both are right)."""
    out = []
    for p in plans:
        got = reported.get(p.name)
        if got and got[1] in T.__members__ and got[1] != p.type_out:
            new = T[got[1]]
            p = replace(p, type_out=new.name, bytes_out=tensor_nbytes(p.shape, new))
        out.append(p)
    return out


def _check_imatrix_covers(imat: Imatrix, model: GGUFModelFile, plans: list[QuantizedTensor], ftype: str) -> None:
    """Fail early, with a clear message, where llama.cpp would stop half-way."""
    shapes = {t.name: t.shape for t in model.tensors}
    for p in plans:
        if p.type_in == p.type_out:
            continue
        values = imat.get(p.name)
        shape = shapes[p.name]
        if values is not None and p.name != "token_embd.weight":
            imat.for_tensor(p.name, shape[0], shape[2] if len(shape) > 2 else 1)
        if values is None and quant_rules.requires_imatrix(p.name, T[p.type_out], ftype):
            raise ImatrixRequired(f"the importance matrix has no entry for {p.name}, which {ftype} "
                                  "quantizes to " + p.type_out + " (is it for this model?)", path=imat.path)


def _run_split(job: dict[str, Any], out: Path, targets: list[Path], progress: ProgressFn, total: int) -> None:
    prefix = out.parent / f".{out.stem}.{uuid.uuid4().hex[:8]}.corral-tmp"
    temps = split_output_paths(prefix, len(targets))  # llama_split_path: PREFIX-0000i-of-0000N.gguf
    try:
        job["out"] = str(prefix)
        run_child(job, progress, total)
        for tmp in temps:
            fsync_path(tmp)
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
