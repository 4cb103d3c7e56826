"""Checkpoints read back as tensors, and the padded "large slow target": a trained model plus inert layers.

An added layer's o_proj and down_proj are zero, so it adds exactly zero to the residual stream: the padded model
computes the trained model's function (up to the order of float accumulation) while doing the work of a deeper,
wider model. A larger `n_ff` widens every layer's FFN; the trained layers' new rows of gate/up are random and the
matching new columns of down_proj zero, so their output is unchanged too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from corral.convert.minimodel import build_checkpoint

from .model import Shape


def read_shape(checkpoint_dir: Path) -> Shape:
    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    return Shape(n_embd=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
                 n_head_kv=cfg["num_key_value_heads"], n_ff=cfg["intermediate_size"])


def read_weights(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF checkpoint folder as float32 (any of the dtypes the writer uses)."""
    from safetensors.torch import load_file

    out: dict[str, np.ndarray] = {}
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        out.update({name: t.float().numpy() for name, t in load_file(str(path)).items()})
    return out


def pad_layers(checkpoint_dir: str | Path, out_dir: str | Path, extra_layers: int, *, n_ff: int | None = None,
               seed: int = 0, std: float = 0.02) -> Path:
    """Write `checkpoint_dir`'s model with `extra_layers` inert decoder layers appended (and FFNs widened to `n_ff`)."""
    src = Path(checkpoint_dir)
    shape = read_shape(src)
    width = n_ff or shape.n_ff
    if width < shape.n_ff or extra_layers < 0:
        raise ValueError(f"cannot shrink the model: n_ff {width} < {shape.n_ff} or {extra_layers} layers")
    weights = read_weights(src)
    rng = np.random.default_rng(seed)

    def rand(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * np.float32(std)).astype(np.float32)

    grow = width - shape.n_ff
    out = dict(weights)
    for i in range(shape.n_layer):
        p = f"model.layers.{i}.mlp"
        out[f"{p}.gate_proj.weight"] = np.concatenate([weights[f"{p}.gate_proj.weight"], rand(grow, shape.n_embd)])
        out[f"{p}.up_proj.weight"] = np.concatenate([weights[f"{p}.up_proj.weight"], rand(grow, shape.n_embd)])
        out[f"{p}.down_proj.weight"] = np.concatenate(
            [weights[f"{p}.down_proj.weight"], np.zeros((shape.n_embd, grow), np.float32)], axis=1)
    kv = shape.n_head_kv * shape.head_dim
    for i in range(shape.n_layer, shape.n_layer + extra_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = np.ones(shape.n_embd, np.float32)
        out[f"{p}.post_attention_layernorm.weight"] = np.ones(shape.n_embd, np.float32)
        out[f"{p}.self_attn.q_proj.weight"] = rand(shape.n_embd, shape.n_embd)
        out[f"{p}.self_attn.k_proj.weight"] = rand(kv, shape.n_embd)
        out[f"{p}.self_attn.v_proj.weight"] = rand(kv, shape.n_embd)
        out[f"{p}.self_attn.o_proj.weight"] = np.zeros((shape.n_embd, shape.n_embd), np.float32)
        out[f"{p}.mlp.gate_proj.weight"] = rand(width, shape.n_embd)
        out[f"{p}.mlp.up_proj.weight"] = rand(width, shape.n_embd)
        out[f"{p}.mlp.down_proj.weight"] = np.zeros((shape.n_embd, width), np.float32)
    padded = Shape(shape.n_embd, shape.n_layer + extra_layers, shape.n_head, shape.n_head_kv, width)
    return build_checkpoint(out_dir, padded.mini_spec(), weights=out)
