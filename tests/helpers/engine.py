"""Tiny Llama-3-vocabulary GGUF files for the runtime tests (any chat template, seeded random weights)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from corral.convert import llama3_tokenizer
from corral.offload.plan import Plan
from tests.helpers.plans import make_plan


@lru_cache(maxsize=1)
def _vocab() -> tuple[list[str], list[int], list[str]]:
    doc = json.loads(llama3_tokenizer.tokenizer_json())
    model = doc["model"]
    n = len(model["vocab"]) + len(doc["added_tokens"])
    tokens = [""] * n
    types = [int(gguf.TokenType.NORMAL)] * n
    for text, i in model["vocab"].items():
        tokens[i] = text
    for added in doc["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL)
    return tokens, types, list(model["merges"])


def write_tiny_gguf(path: Path, *, chat_template: str | None = llama3_tokenizer.LLAMA3_CHAT_TEMPLATE,
                    hidden: int = 64, n_layers: int = 2, n_heads: int = 2, n_kv_heads: int = 1, ffn: int = 128,
                    seed: int = 0, context_length: int = 8192, name: str = "Tiny Llama 3",
                    dominant_token: int | None = None, extra_layers: int = 0, extra_scale: float = 0.0,
                    layer_dtype: type = np.float32) -> Path:
    """Write a llama-architecture GGUF with the real Llama 3 tokenizer and `chat_template`.

    With `dominant_token`, every embedding carries a large constant in dimension 0, the layers
    barely touch the residual stream, and that token's output row reads dimension 0: the model
    then always predicts `dominant_token` (used to make a model that ends its turn at once).
    `extra_layers` appends layers whose output projections (attn_output, ffn_down) are scaled by
    `extra_scale`: at 0 they leave the residual stream alone, so the model computes exactly the
    function of the same seed without them (a heavier target that a draft always agrees with).
    """
    tokens, types, merges = _vocab()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(n_layers + extra_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(hidden // n_heads)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128009)
    w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def mat(rows: int, cols: int, dtype: type = np.float16) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(dtype)

    kv = hidden // n_heads * n_kv_heads
    layer_scale = 1.0 if dominant_token is None else 1e-3
    embd = mat(len(tokens), hidden)
    output = mat(len(tokens), hidden)
    if dominant_token is not None:
        embd[:, 0] = 8.0
        output[:, 0] = 0.0
        output[dominant_token, :] = 0.0
        output[dominant_token, 0] = 50.0
    w.add_tensor("token_embd.weight", embd)
    for i in range(n_layers + extra_layers):
        scale = layer_scale if i < n_layers else extra_scale
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(hidden, hidden, layer_dtype))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(kv, hidden, layer_dtype))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(kv, hidden, layer_dtype))
        w.add_tensor(f"blk.{i}.attn_output.weight", (mat(hidden, hidden, np.float32) * scale).astype(layer_dtype))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(ffn, hidden, layer_dtype))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(ffn, hidden, layer_dtype))
        w.add_tensor(f"blk.{i}.ffn_down.weight", (mat(hidden, ffn, np.float32) * scale).astype(layer_dtype))
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("output.weight", output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def cpu_plan(**changes: Any) -> Plan:
    """The planner's plan for the tiny model on a CPU-only test machine: one thread, no GPU, a 1024-token
    context; `changes` name Plan or LoadSettings fields to replace (see tests.helpers.plans.make_plan)."""
    return make_plan(**changes)


_CACHE: dict[str, Path] = {}


def shared_tiny_gguf(factory: object) -> Path:
    """One default tiny GGUF per test session, shared by the runtime test modules."""
    if "default" not in _CACHE:
        _CACHE["default"] = write_tiny_gguf(factory.mktemp("tiny-shared") / "tiny.gguf")  # type: ignore[attr-defined]
    return _CACHE["default"]
