"""Llama tensors: HF -> GGUF names, expected shapes, Q/K rope permutation, rope_freqs, output types.

Facts from llama.cpp's converter (conversion/llama.py, conversion/base.py): q_proj/k_proj rows are
re-ordered from HF's half-split rope layout to GGML's interleaved one; llama3 rope scaling becomes
an F32 `rope_freqs.weight` tensor of head_dim/2 factors; 1-D tensors and norms stay F32; Q8_0
falls back to F16 for rows that are not a multiple of the 32-value block.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from gguf import MODEL_ARCH, GGMLQuantizationType, LlamaFileType, get_tensor_name_map

from .errors import InvalidConfig
from .hf_checkpoint import LlamaConfig, RopeScaling

ARCH = MODEL_ARCH.LLAMA
ARCH_NAME = "llama"
ROPE_FREQS_NAME = "rope_freqs.weight"

OUTTYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
_FTYPE_TENSOR_TYPE = {
    LlamaFileType.ALL_F32: GGMLQuantizationType.F32,
    LlamaFileType.MOSTLY_F16: GGMLQuantizationType.F16,
    LlamaFileType.MOSTLY_BF16: GGMLQuantizationType.BF16,
    LlamaFileType.MOSTLY_Q8_0: GGMLQuantizationType.Q8_0,
}


@lru_cache(maxsize=8)
def _name_map(n_layers: int):  # type: ignore[no-untyped-def]
    return get_tensor_name_map(ARCH, n_layers)


def gguf_name(hf_name: str, n_layers: int) -> str | None:
    """The GGUF tensor name of an HF Llama tensor, or None when it has none."""
    return _name_map(n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))


def expected_shape(hf_name: str, cfg: LlamaConfig) -> tuple[int, ...] | None:
    """The torch-order shape config.json implies for `hf_name` (None: not a known Llama weight)."""
    h, q, kv = cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, h)
    if hf_name == "model.norm.weight":
        return (h,)
    suffixes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (cfg.ffn, h),
        "mlp.up_proj.weight": (cfg.ffn, h),
        "mlp.down_proj.weight": (h, cfg.ffn),
    }
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdecimal():
        if int(parts[2]) >= cfg.n_layers:
            return None
        return suffixes.get(parts[3])
    return None


def permute_heads(hf_name: str, cfg: LlamaConfig) -> int | None:
    """Number of head groups for the rope permutation of `hf_name` (None: no permutation)."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return cfg.n_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return cfg.n_kv_heads
    return None


def permute_rows(arr: np.ndarray, n_groups: int) -> np.ndarray:
    """HF half-split rope rows -> GGML interleaved rows; `arr` holds whole head groups (any dtype)."""
    rows = arr.shape[0]
    if rows % (2 * n_groups):
        raise InvalidConfig(f"cannot permute {rows} rows into {n_groups} rope heads")
    half = rows // n_groups // 2
    out = arr.reshape(n_groups, 2, half, *arr.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(out).reshape(arr.shape)


def rope_freq_factors(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """Llama 3 rope scaling factors (head_dim/2 float32 values), bit-identical to llama.cpp's converter.

    That converter evaluates the formula with float32 torch tensors, where `scalar / tensor` is
    `tensor.reciprocal() * scalar`; the same operations in the same order are used here.
    """
    f32 = np.float32
    one = f32(1)
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / f32(head_dim)
    freqs = (one / np.power(f32(theta), exponents, dtype=np.float32)) * one
    low_wavelen = f32(s.original_max_position_embeddings / s.low_freq_factor)
    high_wavelen = f32(s.original_max_position_embeddings / s.high_freq_factor)
    out = np.empty(len(freqs), dtype=np.float32)
    for i, freq in enumerate(freqs):
        wavelen = (one / freq) * f32(2 * math.pi)
        if wavelen < high_wavelen:
            out[i] = 1.0
        elif wavelen > low_wavelen:
            out[i] = s.factor
        else:
            smooth = ((one / wavelen) * f32(s.original_max_position_embeddings) - f32(s.low_freq_factor)) / f32(
                s.high_freq_factor - s.low_freq_factor
            )
            out[i] = (one / ((one - smooth) / f32(s.factor) + smooth)) * one
    return out


def tensor_type(name: str, shape: tuple[int, ...], ftype: LlamaFileType) -> GGMLQuantizationType:
    """The GGML type llama.cpp's converter gives tensor `name` (torch-order `shape`) for file type `ftype`."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return GGMLQuantizationType.F32
    qtype = _FTYPE_TENSOR_TYPE[ftype]
    if qtype == GGMLQuantizationType.Q8_0 and shape[-1] % 32:
        return GGMLQuantizationType.F16
    return qtype


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of torch-order `shape` stored as `qtype`."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    if shape and shape[-1] % block:
        raise InvalidConfig(f"row of {shape[-1]} values is not a multiple of the {qtype.name} block size {block}")
    return n // block * size
