"""Predict the ggml type llama.cpp's quantizer picks for every tensor of a model (pure; no llama_cpp).

The rules are a transcription, as code, of llama.cpp's `src/llama-quant.cpp`
(`tensor_allows_quantization`, `tensor_get_category`, `llama_tensor_get_type_impl`,
`tensor_type_fallback`, `tensor_requires_imatrix`, `llama_ftype_get_default_type`) as shipped in
llama-cpp-python 0.3.36. They include the order-dependent counters the C code keeps (attn_v and
ffn_down "use more bits" by layer), the shape fallbacks when a row is not a multiple of the block
size, 1-D tensors kept as they are, the tied-embedding rule and the imatrix-dependent choices.
Tests check them against the types llama.cpp really writes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from gguf import GGMLQuantizationType, LlamaFileType

from .errors import UnsupportedModel, UsageError

# Tensor specs and sizes live in tensor_specs; re-exported here, where callers have always found them.
from .tensor_specs import (  # noqa: F401
    GGUF_ALIGNMENT,
    ModelHParams,
    TensorSpec,
    _pad,
    block_size,
    infer_hparams,
    is_quantized,
    layer_of,
    llama_cpp_order,
    n_dims,
    tensor_info_bytes,
    tensor_nbytes,
)

T = GGMLQuantizationType
F = LlamaFileType

# llama_ftype_get_default_type(): file types whose default tensor type is not the type of the same name.
_IRREGULAR_DEFAULTS: dict[str, T] = {
    "ALL_F32": T.F32,
    "MOSTLY_Q2_K_S": T.Q2_K,
    "MOSTLY_IQ3_XS": T.IQ3_S,
    "MOSTLY_IQ2_S": T.IQ2_XS,
    "MOSTLY_IQ2_M": T.IQ2_S,
    "MOSTLY_IQ3_M": T.IQ3_S,
    "MOSTLY_MXFP4_MOE": T.MXFP4,
}
# File types that exist in the enum but that this llama.cpp's quantizer refuses (default type COUNT).
_NO_DEFAULT = frozenset({"MOSTLY_NVFP4", "GUESSED"})

# Substrings of tensor names that llama.cpp never quantizes (architecture-independent part of
# tensor_allows_quantization).
_NEVER_QUANTIZED_PARTS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})

# Tensor types that need an importance matrix (tensor_requires_imatrix).
IMATRIX_TYPES = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})

_TIER_IQ2 = frozenset({F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M,
                       F.MOSTLY_IQ1_M})
_OUTPUT_Q5K = frozenset({F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S,
                         F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M})
_MOE8_ATTN_OUT_Q5K = frozenset({
    F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL,
    F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ4_XS})

def _some(enum: type, *names: str) -> frozenset:
    """The members of `enum` with these names that this gguf version has (newer llama.cpp types may be absent)."""
    return frozenset(enum[n] for n in names if n in enum.__members__)


# Short names llama-quantize also accepts (tools/quantize/quantize.cpp): the medium K mixes.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def ftype_from_name(ftype: str | LlamaFileType) -> LlamaFileType:
    """'Q4_K_M' / 'q4_k_m' / 'MOSTLY_Q4_K_M' / LlamaFileType -> LlamaFileType."""
    if isinstance(ftype, LlamaFileType):
        return ftype
    key = str(ftype).strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    for candidate in (key, f"MOSTLY_{key}", f"ALL_{key}"):
        if candidate in F.__members__ and candidate not in _NO_DEFAULT:
            return F[candidate]
    raise UsageError(f"unknown quantization type {ftype!r}")


def default_tensor_type(ftype: str | LlamaFileType) -> GGMLQuantizationType:
    """The tensor type a file type quantizes to before per-tensor adjustments."""
    ft = ftype_from_name(ftype)
    if ft.name in _NO_DEFAULT:
        raise UsageError(f"quantization type {ft.name} is not supported by this llama.cpp")
    if ft.name in _IRREGULAR_DEFAULTS:
        return _IRREGULAR_DEFAULTS[ft.name]
    base = ft.name.removeprefix("MOSTLY_")
    for candidate in (base, re.sub(r"_[SML]$", "", base)):
        if candidate in T.__members__:
            return T[candidate]
    raise UsageError(f"quantization type {ft.name} is not supported by this llama.cpp")


def category(name: str) -> str:
    """tensor_get_category(): broad role of a tensor by name."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                      ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                      ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                      ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


def _is_attn_v_like(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def allows_quantization(spec: TensorSpec, *, quantize_output: bool = True) -> bool:
    """tensor_allows_quantization(): 2-D/3-D '*weight' tensors that are not norms, gates, etc."""
    if n_dims(spec.shape) < 2:
        return False
    name = spec.name
    if not name.endswith("weight"):
        return False
    if not quantize_output and name == "output.weight":
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(part in name for part in _NEVER_QUANTIZED_PARTS)


def requires_imatrix(name: str, ggml_type: GGMLQuantizationType, ftype: str | LlamaFileType) -> bool:
    """tensor_requires_imatrix(): very low-bit tensor types need an importance matrix."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if ggml_type in IMATRIX_TYPES:
        return True
    return ggml_type == T.Q2_K and ftype_from_name(ftype) == F.MOSTLY_Q2_K_S


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class _State:
    """The counters quantize_state_impl keeps while it walks the tensors."""

    hp: ModelHParams
    ftype: LlamaFileType
    has_imatrix: bool
    tied: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    fallbacks: list[str] = field(default_factory=list)

    def layer(self, counter: int, name: str) -> tuple[int, int]:
        if max(1, self.hp.n_expert) > 1:
            i_layer = layer_of(name)
            if not 0 <= i_layer < self.hp.n_layer:
                raise UnsupportedModel(f"cannot tell the layer of tensor {name}")
            return i_layer, self.hp.n_layer
        return counter, self.hp.n_layer


def _output_type(st: _State, new: T, ne0: int) -> T:
    ft = st.ftype
    if ft == F.MOSTLY_MXFP4_MOE or st.hp.arch == "falcon" or ne0 % block_size(new):
        return T.Q8_0
    if ft in _OUTPUT_Q5K:
        return T.Q5_K
    return T.Q6_K if new != T.Q8_0 else new


def _iq2_tier(st: _State, new: T, cat: str) -> T:
    ft, hp = st.ftype, st.hp
    s_or_m = ft in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M)
    if _is_attn_v_like(cat):
        new = T.Q4_K if (hp.n_gqa >= 4 or hp.n_expert >= 4) else (T.IQ3_S if s_or_m else T.Q2_K)
        st.i_attention_wv += 1
    elif hp.n_expert == 8 and cat == "attn_k":
        new = T.Q4_K
    elif cat == "ffn_down":
        if st.i_ffn_down < hp.n_layer // 8:
            new = T.IQ3_S if s_or_m else T.Q2_K
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if hp.n_expert == 8:
            new = T.Q5_K
        elif ft in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            new = T.IQ2_XXS
        elif s_or_m:
            new = T.IQ3_S
    return new


def _attn_v(st: _State, new: T) -> T:
    ft, hp, gqa4 = st.ftype, st.hp, st.hp.n_gqa >= 4
    if ft == F.MOSTLY_Q2_K:
        new = T.Q4_K if gqa4 else T.Q3_K
    elif ft == F.MOSTLY_Q2_K_S and gqa4:
        new = T.Q4_K
    elif ft == F.MOSTLY_IQ3_XXS:
        new = T.Q4_K if gqa4 else (T.IQ3_XXS if st.has_imatrix else T.IQ3_S)
    elif ft in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and gqa4:
        new = T.Q4_K
    elif ft == F.MOSTLY_IQ3_M:
        new = T.Q4_K
    elif ft == F.MOSTLY_Q3_K_M:
        new = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
    elif ft == F.MOSTLY_Q3_K_L:
        new = T.Q5_K
    elif ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and gqa4:
        new = T.Q5_K
    elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
        new = T.Q6_K
    elif ft == F.MOSTLY_Q4_K_S and st.i_attention_wv < 4:
        new = T.Q5_K
    if hp.is_70b and new in (T.Q3_K, T.Q4_K):
        new = T.Q5_K
    if hp.n_expert == 8:
        new = T.Q8_0
    st.i_attention_wv += 1
    return new


def _ffn_down(st: _State, new: T, name: str) -> T:
    ft, hp = st.ftype, st.hp
    i, n = st.layer(st.i_ffn_down, name)
    falcon = hp.arch == "falcon"
    if ft == F.MOSTLY_Q2_K:
        new = T.Q3_K
    elif ft == F.MOSTLY_Q2_K_S:
        if i < n // 8:
            new = T.Q4_K
    elif ft == F.MOSTLY_IQ3_XXS and not st.has_imatrix:
        new = T.Q4_K if i < n // 8 else T.Q3_K
    elif ft == F.MOSTLY_Q3_K_M:
        new = T.Q5_K if i < n // 16 else (T.Q4_K if not falcon or _use_more_bits(i, n) else T.Q3_K)
    elif ft == F.MOSTLY_IQ3_M and (i < n // 8 or (hp.n_expert == 8 and _use_more_bits(i, n))):
        new = T.Q4_K
    elif ft == F.MOSTLY_Q3_K_L:
        new = T.Q4_K if falcon else T.Q5_K
    elif ft == F.MOSTLY_Q4_K_M:
        if falcon:
            new = T.Q6_K if i < n // 16 else (T.Q5_K if _use_more_bits(i, n) else T.Q4_K)
        elif _use_more_bits(i, n):
            new = T.Q6_K
    elif i < n // 8 and ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not st.has_imatrix:
        new = T.Q5_K
    elif ft == F.MOSTLY_Q5_K_M and _use_more_bits(i, n):
        new = T.Q6_K
    elif ft == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
        new = T.Q5_K
    elif ft in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and st.has_imatrix and i < n // 8:
        new = T.Q4_1 if ft == F.MOSTLY_Q4_0 else T.Q5_1
    st.i_ffn_down += 1
    return new


def _attn_output(st: _State, new: T) -> T:
    ft = st.ftype
    if st.hp.arch == "falcon":
        return T.Q4_K if ft == F.MOSTLY_Q3_K_L else new
    if st.hp.n_expert == 8:
        return T.Q5_K if ft in _MOE8_ATTN_OUT_Q5K else new
    return {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_IQ3_XXS: T.IQ3_S, F.MOSTLY_Q3_K_M: T.Q4_K,
            F.MOSTLY_Q3_K_L: T.Q5_K, F.MOSTLY_IQ3_M: T.Q4_K}.get(ft, new)


def _ffn_gate_up(st: _State, new: T, name: str, cat: str) -> T:
    counter = st.i_ffn_gate if cat == "ffn_gate" else st.i_ffn_up
    i, n = st.layer(counter, name)
    if st.ftype == F.MOSTLY_IQ3_XS and n // 8 <= i < 7 * n // 8:
        new = T.IQ3_XXS
    if cat == "ffn_gate":
        st.i_ffn_gate += 1
    else:
        st.i_ffn_up += 1
    return new


def _mixture_type(st: _State, new: T, spec: TensorSpec, cat: str) -> T:
    """llama_tensor_get_type_impl(): the per-tensor choice of the file type's mixture."""
    ft = st.ftype
    if cat == "output" or (st.tied and cat == "token_embd"):
        return _output_type(st, new, spec.shape[0])
    if ft == F.MOSTLY_MXFP4_MOE:
        return T.MXFP4 if len(spec.shape) > 2 and spec.shape[2] > 1 else T.Q8_0
    if cat == "token_embd":
        if ft in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            return T.Q2_K
        if ft in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS):
            return T.IQ3_S
        if ft in _some(F, "MOSTLY_TQ1_0", "MOSTLY_TQ2_0", "MOSTLY_Q2_0"):
            return T.Q4_K
        return new
    if ft in _TIER_IQ2:
        return _iq2_tier(st, new, cat)
    if _is_attn_v_like(cat):
        return _attn_v(st, new)
    if cat == "attn_k":
        if st.hp.n_expert == 8:
            return T.Q8_0
        return {F.MOSTLY_IQ3_XS: T.IQ3_XXS, F.MOSTLY_IQ3_XXS: T.IQ2_S}.get(ft, new)
    if cat == "attn_q":
        return {F.MOSTLY_IQ3_XS: T.IQ3_XXS, F.MOSTLY_IQ3_XXS: T.IQ2_S}.get(ft, new)
    if cat == "ffn_down":
        return _ffn_down(st, new, spec.name)
    if cat == "attn_output":
        return _attn_output(st, new)
    if cat in ("ffn_gate", "ffn_up"):
        return _ffn_gate_up(st, new, spec.name, cat)
    return new


def _fallback(st: _State, spec: TensorSpec, target: T) -> T:
    """tensor_type_fallback(): a compatible type when the row length is not a multiple of the block."""
    ncols = spec.shape[0]
    if ncols % block_size(target) == 0:
        return target
    st.fallbacks.append(spec.name)
    if target in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS):
        result = T.IQ4_NL
    elif target in _some(T, "Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"):
        result = T.Q4_0
    elif target in (T.Q4_K, T.Q5_K, T.Q6_K):
        result = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}[target]
    elif block_size(target) <= 32:
        result = target
    else:
        raise UnsupportedModel(f"llama.cpp has no fallback type for {target.name} (tensor {spec.name})")
    return T.F16 if ncols % block_size(result) else result


def target_types(
    tensors: Sequence[TensorSpec],
    ftype: str | LlamaFileType,
    *,
    has_imatrix: bool = False,
    hparams: ModelHParams | None = None,
    file_order: bool = False,
    quantize_output: bool = True,
    pure: bool = False,
) -> dict[str, GGMLQuantizationType]:
    """The ggml type llama.cpp's quantizer gives every tensor for file type `ftype`.

    Tensors are visited in llama.cpp's loader order unless `file_order` (llama.cpp's keep_split mode
    walks them in file order). `hparams` defaults to what the shapes tell (`infer_hparams`).
    """
    ft = ftype_from_name(ftype)
    default = default_tensor_type(ft)
    hp = hparams or infer_hparams(tensors)
    ordered = list(tensors) if file_order else llama_cpp_order(tensors)
    st = _State(
        hp=hp, ftype=ft, has_imatrix=has_imatrix,
        tied=not any(t.name == "output.weight" for t in ordered),
        n_attention_wv=sum(1 for t in ordered if _is_attn_v_like(category(t.name))),
    )
    result: dict[str, GGMLQuantizationType] = {}
    for spec in ordered:
        if not allows_quantization(spec, quantize_output=quantize_output):
            result[spec.name] = spec.ggml_type
            continue
        if not is_quantized(default):
            result[spec.name] = default
            continue
        new = default if pure else _mixture_type(st, default, spec, category(spec.name))
        result[spec.name] = _fallback(st, spec, new)
    return result


def tensors_needing_imatrix(
    tensors: Sequence[TensorSpec], ftype: str | LlamaFileType, **kwargs: object
) -> list[str]:
    """Names of the tensors that llama.cpp refuses to quantize to `ftype` without an imatrix."""
    types = target_types(tensors, ftype, has_imatrix=False, **kwargs)  # type: ignore[arg-type]
    by_name = {t.name: t for t in tensors}
    return [name for name, typ in types.items()
            if typ != by_name[name].ggml_type and allows_quantization(by_name[name])
            and requires_imatrix(name, typ, ftype)]


def predict_file_bytes(
    tensors: Sequence[TensorSpec],
    ftype: str | LlamaFileType,
    metadata_bytes: int,
    *,
    has_imatrix: bool = False,
    alignment: int = GGUF_ALIGNMENT,
    hparams: ModelHParams | None = None,
) -> int:
    """Size of the quantized GGUF: header+KV (`metadata_bytes`), tensor infos, padded tensor data.

    `metadata_bytes` is the GGUF header (24 bytes) plus the key/value section of the output file;
    tensor-info records and alignment padding are added here, as llama.cpp writes them.
    """
    types = target_types(tensors, ftype, has_imatrix=has_imatrix, hparams=hparams)
    infos = sum(tensor_info_bytes(t.name, t.shape) for t in tensors)
    data = sum(_pad(tensor_nbytes(t.shape, types[t.name]), alignment) for t in tensors)
    return _pad(metadata_bytes + infos, alignment) + data
