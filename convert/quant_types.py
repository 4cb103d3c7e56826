"""llama.cpp file types by name: ids (from gguf's LlamaFileType), imatrix needs, bits per weight, quality notes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from . import quant_rules
from .errors import UsageError
from .llama_family import HERD, gguf_tensor_specs
from .tensor_specs import TensorSpec, tensor_nbytes

ALIASES = quant_rules.ALIASES

# The reference shape used for "effective bits per weight": Llama 3.1 8B (GUIDE.md §3).
_REFERENCE_MODEL = "llama-3.1-8b"


@dataclass(frozen=True)
class FileTypeInfo:
    """One llama.cpp file type (a mixture of tensor types chosen per tensor)."""

    name: str
    ftype: LlamaFileType
    default_type: GGMLQuantizationType
    needs_imatrix: bool
    bpw: float  # nominal bits per weight of the default tensor type
    note: str

    @property
    def id(self) -> int:
        return int(self.ftype)


def _name(ftype: LlamaFileType) -> str:
    return ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _nominal_bpw(ggml_type: GGMLQuantizationType) -> float:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return size * 8 / block


def _note(name: str, bpw: float, needs_imatrix: bool) -> str:
    """One line on what people observe at this size (perplexity studies on Llama 2/3)."""
    if name in ("F32", "F16", "BF16"):
        text = "unquantized: reference quality, largest file"
    elif name == "MXFP4_MOE":
        text = "MXFP4 for mixture-of-experts weights, Q8_0 elsewhere; for MoE models only"
    elif bpw >= 7.5:
        text = "practically lossless"
    elif bpw >= 6:
        text = "near-lossless; a good balance of size and quality"
    elif bpw >= 5:
        text = "very small quality loss"
    elif bpw >= 4:
        text = "small quality loss; the usual pick when memory is tight"
    elif bpw >= 3:
        text = "noticeable quality loss"
    elif bpw >= 2:
        text = "large quality loss"
    else:
        text = "severe quality loss; only for the largest models"
    if needs_imatrix:
        text += "; needs an importance matrix"
    elif name.startswith("IQ") and bpw < 4:
        text += "; better with an importance matrix"
    return text


@cache
def _reference_tensors() -> tuple[TensorSpec, ...]:
    return tuple(gguf_tensor_specs(HERD[_REFERENCE_MODEL][1]))


@cache
def all_file_types() -> tuple[FileTypeInfo, ...]:
    """Every file type this llama.cpp's quantizer accepts, in LlamaFileType order."""
    infos = []
    for ft in LlamaFileType:
        try:
            default = quant_rules.default_tensor_type(ft)
        except UsageError:
            continue  # GUESSED, NVFP4: no quantizer behind them here
        if default not in GGML_QUANT_SIZES:
            continue
        name = _name(ft)
        try:
            needs = bool(quant_rules.tensors_needing_imatrix(_reference_tensors(), ft))
        except Exception:  # a type with no shape fallback for the reference model
            needs = default in quant_rules.IMATRIX_TYPES
        bpw = _nominal_bpw(default)
        infos.append(FileTypeInfo(name, ft, default, needs, bpw, _note(name, bpw, needs)))
    return tuple(infos)


def file_type(name: str | LlamaFileType) -> FileTypeInfo:
    """Look up a file type by name ('Q4_K_M', 'q4_k', 'IQ2_XXS') or LlamaFileType."""
    if isinstance(name, str):
        key = name.strip().upper().replace("-", "_")
        key = ALIASES.get(key, key)
        for info in all_file_types():
            if info.name == key:
                return info
        raise UsageError(f"unknown quantization type {name!r}; choose one of: {', '.join(names())}")
    for info in all_file_types():
        if info.ftype == name:
            return info
    raise UsageError(f"unsupported file type {name!r}")


def names() -> list[str]:
    """All accepted file type names (without aliases)."""
    return [info.name for info in all_file_types()]


@cache
def effective_bpw(name: str) -> float:
    """Bits per weight of the whole file on the Llama 3.1 8B shape, from the per-tensor rules."""
    info = file_type(name)
    tensors = _reference_tensors()
    types = quant_rules.target_types(tensors, info.ftype, has_imatrix=info.needs_imatrix)
    n_weights = sum(math.prod(t.shape) for t in tensors)
    n_bytes = sum(tensor_nbytes(t.shape, types[t.name]) for t in tensors)
    return n_bytes * 8 / n_weights


def quality_table() -> list[tuple[str, float, float, str]]:
    """(name, nominal bpw, bpw on Llama 3.1 8B, note) for every file type."""
    return [(i.name, i.bpw, effective_bpw(i.name), i.note) for i in all_file_types()]
