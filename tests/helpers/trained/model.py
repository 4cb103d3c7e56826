"""A Llama 3.x decoder in torch with Hugging Face's tensor names and conventions (the checkpoint layout).

The same module runs over a reduced vocabulary while training (the ids the corpus uses plus one class standing for
all the others) and over the full 128,256-token vocabulary when read back from an exported checkpoint. Rotary
embeddings use the llama3 scaling of the published 3.1 configs (the factors come from corral's converter, which
writes them into the GGUF as `rope_freqs.weight`), in Hugging Face's rotate-half layout of q/k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from corral.convert.llama_family import RopeScaling, rope_freq_factors
from corral.convert.minimodel import VOCAB_SIZE, MiniSpec

from .corpus import Vocab

ROPE_THETA = 500000.0
RMS_EPS = 1e-5


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def mini_spec(self) -> MiniSpec:
        """The checkpoint writer's spec: a Llama 3.1 base model, float32 (so the exported model is the trained one)."""
        return MiniSpec(n_embd=self.n_embd, n_layer=self.n_layer, n_head=self.n_head, n_head_kv=self.n_head_kv,
                        n_ff=self.n_ff, dtype="float32", shards=2, instruct=False)


def inv_freq(head_dim: int) -> torch.Tensor:
    base = 1.0 / (ROPE_THETA ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = rope_freq_factors(head_dim, ROPE_THETA, RopeScaling()).astype(np.float64)
    return torch.tensor(base / factors, dtype=torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS))


class Attention(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        kv = s.n_head_kv * s.head_dim
        self.q_proj = nn.Linear(s.n_embd, s.n_embd, bias=False)
        self.k_proj = nn.Linear(s.n_embd, kv, bias=False)
        self.v_proj = nn.Linear(s.n_embd, kv, bias=False)
        self.o_proj = nn.Linear(s.n_embd, s.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        s = self.s
        q = self.q_proj(x).view(b, t, s.n_head, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, s.n_head_kv, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, s.n_head_kv, s.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = s.n_head // s.n_head_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, s.n_embd))


class MLP(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.n_embd, s.n_ff, bias=False)
        self.up_proj = nn.Linear(s.n_embd, s.n_ff, bias=False)
        self.down_proj = nn.Linear(s.n_ff, s.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.n_embd)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.n_embd)
        self.mlp = MLP(s)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, s: Shape, n_classes: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(n_classes, s.n_embd)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.n_layer))
        self.norm = RMSNorm(s.n_embd)


class Llama(nn.Module):
    """LlamaForCausalLM's structure and parameter names over `n_classes` tokens."""

    def __init__(self, s: Shape, n_classes: int) -> None:
        super().__init__()
        self.shape = s
        self.model = Inner(s, n_classes)
        self.lm_head = nn.Linear(s.n_embd, n_classes, bias=False)
        self.register_buffer("inv_freq", inv_freq(s.head_dim), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [b, t, n_classes] for token (class) ids [b, t]."""
        t = ids.shape[1]
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def init_weights(model: Llama, generator: torch.Generator) -> None:
    """Normal(0, 0.02) matrices, output projections scaled down by depth, norms at one."""
    scale_out = 0.02 / (2 * model.shape.n_layer) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                std = scale_out if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def class_log_softmax(logits: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Log-probabilities per class, the unseen class counted `n_unseen` times in the normaliser.

    The result at the unseen class is the log-probability of each single unseen id, as in the full vocabulary.
    """
    offset = torch.zeros(logits.shape[-1])
    offset[vocab.unseen_class] = vocab.log_n_unseen
    return logits - torch.logsumexp(logits + offset, dim=-1, keepdim=True)


def export_weights(model: Llama, vocab: Vocab) -> dict[str, np.ndarray]:
    """The full-vocabulary HF checkpoint tensors: unseen ids share the unseen class's embedding and output rows."""
    table = torch.from_numpy(vocab.class_of())
    out: dict[str, np.ndarray] = {}
    for name, p in model.state_dict().items():
        arr = p.detach().to(torch.float32)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            arr = arr[table]
        out[name] = arr.contiguous().numpy()
    return out


def from_weights(shape: Shape, weights: dict[str, np.ndarray]) -> Llama:
    """The full-vocabulary model of a checkpoint's tensors (HF names)."""
    model = Llama(shape, VOCAB_SIZE)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    return model.eval()
