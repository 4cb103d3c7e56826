"""GGUF tensors: the one tensor description, the one byte-size rule, shapes (pure; no llama_cpp).

`TensorSpec` is a GGUF tensor (name, GGUF-order shape, type); the header reader's `GGUFTensor` and the
planner's tensors extend it with where the data lives. `tensor_nbytes` is the only place a tensor's
byte count is computed (gguf-py's `quant_shape_to_byte_shape`). The other rules follow ggml and GGUF
(`ggml_n_dims`, `gguf_write` tensor-info records, GGUF_DEFAULT_ALIGNMENT); the per-tensor type decision
that uses them lives in `quant_rules`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

T = GGMLQuantizationType

# GGUF's default alignment (GGUF_DEFAULT_ALIGNMENT in ggml/include/gguf.h).
GGUF_ALIGNMENT = GGUF_DEFAULT_ALIGNMENT

# Types that are plain numbers, not blocks (ggml_is_quantized() is false for them).
_NOT_QUANTIZED = frozenset({T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64})

_BLK = re.compile(r"^blk\.(\d+)\.")


def tensor_nbytes(shape: Sequence[int], ggml_type: GGMLQuantizationType) -> int:
    """Bytes of a tensor of this GGUF shape (ne0, the row length, first) stored as `ggml_type`.

    A row that is not a whole number of `ggml_type` blocks is a caller's bug (ValueError): GGUF
    headers are checked when read, and the type rules fall back before choosing such a type.
    """
    rows_last = tuple(int(d) for d in reversed(shape)) or (1,)
    return math.prod(quant_shape_to_byte_shape(rows_last, ggml_type))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a GGUF model: name, shape in GGUF order (ne0 first) and type."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType

    @cached_property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @cached_property
    def layer(self) -> int | None:
        """Block index of 'blk.N.*' tensors, None for the others."""
        match = _BLK.match(self.name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ModelHParams:
    """The hyper-parameters the quantizer's rules look at (inferred from tensors when not given)."""

    n_layer: int
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0
    arch: str = "llama"

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # models/llama.cpp: 80 layers with grouped-query attention is LLM_TYPE_70B.
        return self.arch == "llama" and self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv


def is_quantized(ggml_type: GGMLQuantizationType) -> bool:
    """ggml_is_quantized(): block types, not plain floats/ints."""
    return ggml_type not in _NOT_QUANTIZED


def block_size(ggml_type: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[ggml_type][0]


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims(): trailing dimensions of size 1 do not count; at least 1."""
    dims = len(shape)
    while dims > 1 and shape[dims - 1] == 1:
        dims -= 1
    return max(dims, 1)


def layer_of(name: str) -> int:
    """Block index of 'blk.N.*', -1 for tensors outside the blocks."""
    match = _BLK.match(name)
    return int(match.group(1)) if match else -1


def llama_cpp_order(tensors: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The order llama.cpp's loader visits tensors in (weight_name_comparer: by layer, then name)."""
    return sorted(tensors, key=lambda t: (layer_of(t.name), t.name.encode()))


def infer_hparams(tensors: Sequence[TensorSpec], arch: str = "llama") -> ModelHParams:
    """Block count, head ratio and expert count as far as the tensor shapes tell them."""
    n_layer = 1 + max((layer_of(t.name) for t in tensors), default=-1)
    q_rows = k_rows = 0
    n_expert = 0
    for t in tensors:
        if t.name.endswith("attn_q.weight") and len(t.shape) >= 2 and not q_rows:
            q_rows = t.shape[1]
        elif t.name.endswith("attn_k.weight") and len(t.shape) >= 2 and not k_rows:
            k_rows = t.shape[1]
        elif "_exps." in t.name and len(t.shape) >= 3:
            n_expert = max(n_expert, t.shape[2])
    # Only the ratio n_head / n_head_kv matters to the rules; equal head sizes make it q_rows / k_rows.
    n_head, n_head_kv = (q_rows, k_rows) if q_rows and k_rows else (1, 1)
    return ModelHParams(n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_expert=n_expert, arch=arch)


def tensor_info_bytes(name: str, shape: Sequence[int]) -> int:
    """Bytes of one GGUF tensor-info record (name, dims, type, offset)."""
    return 8 + len(name.encode()) + 4 + 8 * n_dims(shape) + 4 + 8


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment

