"""The Llama family in one place: hyper-parameters, HF -> GGUF tensors, rope tensors, special tokens.

- `LlamaHParams`: the hyper-parameters under GGUF's names (n_embd, n_layer, n_head, ...), parsed from
  an HF `config.json` by `hparams_from_hf_config` (old rope_scaling + rope_theta style or the newer
  rope_parameters), read from a GGUF header by the planner, or taken from `HERD` (published shapes).
- HF -> GGUF tensor names (gguf-py's tensor map), the shapes config.json implies, the tensors of the
  GGUF file the converter writes, and the converter's per-tensor output types.
- Facts from llama.cpp's converter (conversion/llama.py, conversion/base.py): q_proj/k_proj rows are
  re-ordered from HF's half-split rope layout to GGML's interleaved one; llama3 rope scaling becomes an
  F32 `rope_freqs.weight` tensor of head_dim/2 factors; 1-D tensors and norms stay F32; Q8_0 falls back
  to F16 for rows that are not a multiple of the 32-value block.
- Llama 3's special tokens (ids from 128000), shared by the tokenizer builder and the chat format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, GGMLQuantizationType, LlamaFileType, get_tensor_name_map

from .errors import InvalidConfig, UnsupportedModel
from .tensor_specs import TensorSpec

T = GGMLQuantizationType
ARCH = MODEL_ARCH.LLAMA
ARCH_NAME = "llama"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
ROPE_FREQS_NAME = "rope_freqs.weight"

# ---------------------------------------------------------------- Llama 3 special tokens

FIRST_SPECIAL_ID = 128000
N_SPECIAL_TOKENS = 256
BOS_TEXT = "<|begin_of_text|>"
EOS_TEXT = "<|end_of_text|>"
EOT_TEXT = "<|eot_id|>"
EOM_TEXT = "<|eom_id|>"
START_HEADER_TEXT = "<|start_header_id|>"
END_HEADER_TEXT = "<|end_header_id|>"
# Llama 3.1 ends a turn with <|eot_id|>, a tool call with <|eom_id|>, a base-model text with <|end_of_text|>.
STOP_TEXTS = (EOT_TEXT, EOM_TEXT, EOS_TEXT)
# Named special tokens of Llama 3.1 in id order from FIRST_SPECIAL_ID; the rest are reserved slots.
NAMED_SPECIAL_TOKENS = (
    BOS_TEXT,
    EOS_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    START_HEADER_TEXT,
    END_HEADER_TEXT,
    EOM_TEXT,
    EOT_TEXT,
    "<|python_tag|>",
)


def special_tokens() -> list[str]:
    """The 256 special tokens, in id order."""
    n_reserved = N_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS)
    return list(NAMED_SPECIAL_TOKENS) + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + n_reserved)]


# ---------------------------------------------------------------- hyper-parameters


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 rope scaling parameters (rope_type llama3)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaHParams:
    """A Llama model's hyper-parameters, named as GGUF names them. `head_dim` 0 means n_embd // n_head."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int = 128256
    head_dim: int = 0
    n_ctx_train: int = 131072
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)  # None: no rope_freqs tensor
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim


# The published shapes of the Llama 3.x herd (each meta-llama repository's config.json).
HERD: dict[str, tuple[str, LlamaHParams]] = {
    "llama-3.1-405b": ("Llama 3.1 405B", LlamaHParams(16384, 126, 128, 8, 53248)),
    "llama-3.1-70b": ("Llama 3.1 70B", LlamaHParams(8192, 80, 64, 8, 28672)),
    "llama-3.1-8b": ("Llama 3.1 8B", LlamaHParams(4096, 32, 32, 8, 14336)),
    "llama-3.3-70b": ("Llama 3.3 70B", LlamaHParams(8192, 80, 64, 8, 28672)),
    "llama-3.2-3b": ("Llama 3.2 3B", LlamaHParams(3072, 28, 24, 8, 8192, tie_embeddings=True)),
    "llama-3.2-1b": ("Llama 3.2 1B", LlamaHParams(2048, 16, 32, 8, 8192, head_dim=64, tie_embeddings=True)),
}


def _int(cfg: dict[str, Any], key: str, path: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidConfig(f"{key} must be a positive integer, got {value!r}", path=path)
    return value


def _float(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidConfig(f"{key} must be a positive number, got {value!r}", path=path)
    return float(value)


def text_config(doc: Any, path: Path) -> dict[str, Any]:
    """config.json as one flat object (a `text_config` merged in) after checking it is a supported Llama."""
    if not isinstance(doc, dict):
        raise InvalidConfig("config is not a JSON object", path=path)
    archs = doc.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else doc.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"unsupported architecture {arch!r} (corral converts {', '.join(SUPPORTED_ARCHITECTURES)})", path=path
        )
    if "text_config" in doc and isinstance(doc["text_config"], dict):
        return {**doc, **doc["text_config"]}
    return doc


def _rope(cfg: dict[str, Any], path: Path) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters")
    if params is None:
        params = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise InvalidConfig("rope_scaling / rope_parameters must be an object", path=path)
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = _float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)), "rope_theta", path)
    rope_type = str(params.get("rope_type", params.get("type", "default")) or "default").lower()
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModel(f"unsupported rope type {rope_type!r} (corral handles default and llama3)", path=path)
    try:
        return theta, RopeScaling(
            factor=float(params.get("factor", 8.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidConfig(f"bad llama3 rope scaling parameters ({exc})", path=path) from exc


def hparams_from_hf_config(doc: Any, path: Path) -> LlamaHParams:
    """Validate a config.json document and return its hyper-parameters (InvalidConfig/UnsupportedModel)."""
    cfg = text_config(doc, path)
    n_embd = _int(cfg, "hidden_size", path)
    n_layer = _int(cfg, "num_hidden_layers", path)
    n_head = _int(cfg, "num_attention_heads", path)
    n_head_kv = cfg.get("num_key_value_heads", n_head)
    if isinstance(n_head_kv, bool) or not isinstance(n_head_kv, int) or n_head_kv <= 0:
        raise InvalidConfig(f"num_key_value_heads must be a positive integer, got {n_head_kv!r}", path=path)
    if n_head % n_head_kv:
        raise InvalidConfig(f"num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}",
                            path=path)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if n_embd % n_head:
            raise InvalidConfig(f"hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}", path=path)
        head_dim = n_embd // n_head
    elif isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise InvalidConfig(f"head_dim must be a positive integer, got {head_dim!r}", path=path)
    if head_dim % 2:
        raise InvalidConfig(f"head_dim {head_dim} must be even", path=path)
    n_ff = _int(cfg, "intermediate_size", path)
    n_vocab = _int(cfg, "vocab_size", path)
    n_ctx_train = _int(cfg, "max_position_embeddings", path)
    rms_eps = _float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", path)
    rope_theta, rope_scaling = _rope(cfg, path)
    return LlamaHParams(
        n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, n_vocab=n_vocab,
        head_dim=head_dim, n_ctx_train=n_ctx_train, rope_theta=rope_theta, rms_eps=rms_eps,
        rope_scaling=rope_scaling, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------- tensors

OUTTYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
_FTYPE_TENSOR_TYPE = {
    LlamaFileType.ALL_F32: T.F32,
    LlamaFileType.MOSTLY_F16: T.F16,
    LlamaFileType.MOSTLY_BF16: T.BF16,
    LlamaFileType.MOSTLY_Q8_0: T.Q8_0,
}
# The weights of one decoder layer, HF name after `model.layers.N.`.
LAYER_WEIGHTS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@lru_cache(maxsize=8)
def _name_map(n_layer: int):  # type: ignore[no-untyped-def]
    return get_tensor_name_map(ARCH, n_layer)


def gguf_name(hf_name: str, n_layer: int) -> str | None:
    """The GGUF tensor name of an HF Llama tensor, or None when it has none."""
    return _name_map(n_layer).get_name(hf_name, try_suffixes=(".weight", ".bias"))


def required_hf_tensors(hp: LlamaHParams) -> list[str]:
    """The HF weights every checkpoint of these hyper-parameters must carry."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not hp.tie_embeddings:
        names.append("lm_head.weight")
    return names + [f"model.layers.{i}.{p}.weight" for i in range(hp.n_layer) for p in LAYER_WEIGHTS]


def expected_shape(hf_name: str, hp: LlamaHParams) -> tuple[int, ...] | None:
    """The torch-order shape the hyper-parameters imply for `hf_name` (None: not a known Llama weight)."""
    h, q, kv = hp.n_embd, hp.n_head * hp.head_dim, hp.n_embd_kv
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (hp.n_vocab, h)
    if hf_name == "model.norm.weight":
        return (h,)
    suffixes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (hp.n_ff, h),
        "mlp.up_proj.weight": (hp.n_ff, h),
        "mlp.down_proj.weight": (h, hp.n_ff),
    }
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdecimal():
        if int(parts[2]) >= hp.n_layer:
            return None
        return suffixes.get(parts[3])
    return None


def gguf_tensor_specs(hp: LlamaHParams, dtype: GGMLQuantizationType = T.BF16) -> list[TensorSpec]:
    """The tensors of a Llama GGUF as the converter writes them (matrices in `dtype`, 1-D tensors in F32)."""
    h, hd = hp.n_embd, hp.head_dim
    specs = [TensorSpec("token_embd.weight", (h, hp.n_vocab), dtype), TensorSpec("output_norm.weight", (h,), T.F32)]
    if not hp.tie_embeddings:
        specs.append(TensorSpec("output.weight", (h, hp.n_vocab), dtype))
    if hp.rope_scaling is not None:
        specs.append(TensorSpec(ROPE_FREQS_NAME, (hd // 2,), T.F32))
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        specs += [
            TensorSpec(p + "attn_norm.weight", (h,), T.F32),
            TensorSpec(p + "attn_q.weight", (h, hp.n_head * hd), dtype),
            TensorSpec(p + "attn_k.weight", (h, hp.n_head_kv * hd), dtype),
            TensorSpec(p + "attn_v.weight", (h, hp.n_head_kv * hd), dtype),
            TensorSpec(p + "attn_output.weight", (hp.n_head * hd, h), dtype),
            TensorSpec(p + "ffn_norm.weight", (h,), T.F32),
            TensorSpec(p + "ffn_gate.weight", (h, hp.n_ff), dtype),
            TensorSpec(p + "ffn_up.weight", (h, hp.n_ff), dtype),
            TensorSpec(p + "ffn_down.weight", (hp.n_ff, h), dtype),
        ]
    return specs


def permute_heads(hf_name: str, hp: LlamaHParams) -> int | None:
    """Number of head groups for the rope permutation of `hf_name` (None: no permutation)."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return hp.n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return hp.n_head_kv
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
        return T.F32
    qtype = _FTYPE_TENSOR_TYPE[ftype]
    if qtype == T.Q8_0 and shape[-1] % 32:
        return T.F16
    return qtype
