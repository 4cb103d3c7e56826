"""Miniature Llama-3.1-architecture checkpoints, built offline, for the demo, tests and benchmarks.

A checkpoint here is a Hugging Face folder written the way the published meta-llama
repositories write theirs: `config.json` (rope_scaling llama3 + rope_theta, no head_dim, or
the newer `rope_parameters` style), `generation_config.json`, the real 128,256-token Llama 3
`tokenizer.json` + `tokenizer_config.json` (with a chat template for instruct models), and
seeded random weights in sharded safetensors with `model.safetensors.index.json`.
The weights are random, so the model's replies are noise; its shapes, tokenizer and file
layout are those of the real family, which is what conversion, quantization, planning and
the runtime care about.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from . import llama3_tokenizer as tok
from .errors import UsageError
from .llama_family import LlamaHParams, RopeScaling
from .safetensors_io import float32_to_bf16_bytes, write_safetensors

VOCAB_SIZE = 128256
DTypeName = Literal["bfloat16", "float16", "float32"]
_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class MiniSpec:
    """Shape (GGUF's hyper-parameter names) and file layout of a miniature checkpoint."""

    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 8
    n_head_kv: int = 2
    n_ff: int = 512
    tie_embeddings: bool = False
    dtype: DTypeName = "bfloat16"
    shards: int = 2
    config_style: Literal["rope_scaling", "rope_parameters"] = "rope_scaling"
    head_dim_in_config: bool = False
    instruct: bool = True
    rope_scaling: bool = True
    n_ctx_train: int = 131072
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hparams(self) -> LlamaHParams:
        """The hyper-parameters the checkpoint's config.json describes."""
        return LlamaHParams(
            n_embd=self.n_embd, n_layer=self.n_layer, n_head=self.n_head, n_head_kv=self.n_head_kv, n_ff=self.n_ff,
            n_vocab=VOCAB_SIZE, head_dim=self.head_dim, n_ctx_train=self.n_ctx_train, rope_theta=self.rope_theta,
            rms_eps=self.rms_eps, rope_scaling=RopeScaling() if self.rope_scaling else None,
            tie_embeddings=self.tie_embeddings,
        )

    def validate(self) -> None:
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise UsageError(f"bad miniature shape: {self.n_embd} n_embd, {self.n_head} heads, {self.n_head_kv} kv")
        if (self.n_embd // self.n_head) % 2:
            raise UsageError("head_dim must be even (rotary embeddings)")
        if self.shards < 1:
            raise UsageError("shards must be >= 1")


def config_json(spec: MiniSpec) -> dict[str, object]:
    """`config.json` as the published Llama 3.1 repositories write it."""
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009] if spec.instruct else 128001,
        "hidden_act": "silu",
        "hidden_size": spec.n_embd,
        "initializer_range": 0.02,
        "intermediate_size": spec.n_ff,
        "max_position_embeddings": spec.n_ctx_train,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": spec.n_head,
        "num_hidden_layers": spec.n_layer,
        "num_key_value_heads": spec.n_head_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": spec.rms_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    if spec.config_style == "rope_parameters":
        params = {"rope_theta": spec.rope_theta, "rope_type": "default"}
        if spec.rope_scaling:
            params.update(scaling)
        config["rope_parameters"] = params
        config["dtype"] = spec.dtype
        config["transformers_version"] = "5.0.0"
    else:
        config["rope_scaling"] = scaling if spec.rope_scaling else None
        config["rope_theta"] = spec.rope_theta
        config["torch_dtype"] = spec.dtype
        config["transformers_version"] = "4.43.0.dev0"
    if spec.head_dim_in_config:
        config["head_dim"] = spec.head_dim
    return config


def generation_config_json(spec: MiniSpec) -> dict[str, object]:
    config: dict[str, object] = {"bos_token_id": 128000, "transformers_version": "4.43.0.dev0"}
    if spec.instruct:
        config.update({"do_sample": True, "eos_token_id": [128001, 128008, 128009], "temperature": 0.6, "top_p": 0.9})
    else:
        config["eos_token_id"] = 128001
    return config


def hf_tensor_shapes(spec: MiniSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, torch-order shape) of every weight of the checkpoint, in the published order."""
    kv = spec.n_head_kv * spec.head_dim
    yield "model.embed_tokens.weight", (VOCAB_SIZE, spec.n_embd)
    for i in range(spec.n_layer):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (spec.n_embd,)
        yield f"{p}.mlp.down_proj.weight", (spec.n_embd, spec.n_ff)
        yield f"{p}.mlp.gate_proj.weight", (spec.n_ff, spec.n_embd)
        yield f"{p}.mlp.up_proj.weight", (spec.n_ff, spec.n_embd)
        yield f"{p}.post_attention_layernorm.weight", (spec.n_embd,)
        yield f"{p}.self_attn.k_proj.weight", (kv, spec.n_embd)
        yield f"{p}.self_attn.o_proj.weight", (spec.n_embd, spec.n_embd)
        yield f"{p}.self_attn.q_proj.weight", (spec.n_embd, spec.n_embd)
        yield f"{p}.self_attn.v_proj.weight", (kv, spec.n_embd)
    yield "model.norm.weight", (spec.n_embd,)
    if not spec.tie_embeddings:
        yield "lm_head.weight", (VOCAB_SIZE, spec.n_embd)


def random_weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded float32 weights: norms near 1, matrices with 1/sqrt(fan_in) scale."""
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    scale = 1.0 if "embed_tokens" in name else 1.0 / np.sqrt(shape[1])
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def encode(arr: np.ndarray, dtype: DTypeName) -> bytes:
    if dtype == "bfloat16":
        return float32_to_bf16_bytes(arr)
    if dtype == "float16":
        return arr.astype("<f2").tobytes()
    return arr.astype("<f4").tobytes()


def _shard_groups(spec: MiniSpec) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the tensors, in order, into `spec.shards` non-empty groups of roughly equal bytes."""
    items = list(hf_tensor_shapes(spec))
    n_groups = min(spec.shards, len(items))
    sizes = np.cumsum([int(np.prod(shape)) for _, shape in items])
    cuts = [0]
    for k in range(1, n_groups):
        by_bytes = int(np.searchsorted(sizes, sizes[-1] * k / n_groups)) + 1
        cuts.append(min(max(by_bytes, cuts[-1] + 1), len(items) - (n_groups - k)))
    cuts.append(len(items))
    return [items[a:b] for a, b in zip(cuts, cuts[1:])]


def build_checkpoint(out_dir: str | Path, spec: MiniSpec = MiniSpec(), seed: int = 0,
                     weights: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write a miniature Llama 3.1 checkpoint folder to `out_dir` and return its path.

    `weights` (HF name -> float32 array, every tensor of the spec) replaces the seeded random weights.
    """
    spec.validate()
    if weights is not None:
        expected = dict(hf_tensor_shapes(spec))
        got = {name: tuple(arr.shape) for name, arr in weights.items()}
        if got != expected:
            raise UsageError("the given weights do not match the miniature spec's tensors and shapes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups = _shard_groups(spec)
    st_dtype = _ST_DTYPE[spec.dtype]
    weight_map: dict[str, str] = {}
    total_size = 0
    for index, group in enumerate(groups, 1):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
        for name, shape in group:
            arr = random_weight(rng, name, shape) if weights is None else np.asarray(weights[name], np.float32)
            data = encode(arr, spec.dtype)
            tensors[name] = (st_dtype, shape, data)
            weight_map[name] = fname
            total_size += len(data)
        write_safetensors(out / fname, tensors, metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        index_doc = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config_json(spec), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config_json(spec), indent=2) + "\n")
    (out / "tokenizer.json").write_text(tok.tokenizer_json(), encoding="utf-8")
    tok_config = tok.tokenizer_config(instruct=spec.instruct, max_length=spec.n_ctx_train)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "corral-mini.json").write_text(json.dumps({"seed": seed, **asdict(spec)}, indent=2) + "\n")
    return out
