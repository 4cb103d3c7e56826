"""The Llama 3.x herd's published shapes (from each repo's config.json), so models can be planned unseen."""

from __future__ import annotations

from dataclasses import dataclass, replace

from corral.convert.errors import UsageError


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters that decide tensor shapes, KV size and compute buffers."""

    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int = 128256
    head_dim: int | None = None  # None: n_embd // n_head
    n_ctx_train: int = 131072
    tie_embeddings: bool = False
    rope_freqs: bool = True  # llama3 rope scaling -> rope_freqs.weight
    rms_eps: float = 1e-5

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


# meta-llama/Llama-3.1-*/config.json and Llama-3.2-*/config.json (hidden, layers, heads, kv heads, ffn).
_BASE = {
    "llama-3.1-405b": ModelShape("Llama 3.1 405B", 16384, 126, 128, 8, 53248),
    "llama-3.1-70b": ModelShape("Llama 3.1 70B", 8192, 80, 64, 8, 28672),
    "llama-3.1-8b": ModelShape("Llama 3.1 8B", 4096, 32, 32, 8, 14336),
    "llama-3.3-70b": ModelShape("Llama 3.3 70B", 8192, 80, 64, 8, 28672),
    "llama-3.2-3b": ModelShape("Llama 3.2 3B", 3072, 28, 24, 8, 8192, tie_embeddings=True),
    "llama-3.2-1b": ModelShape("Llama 3.2 1B", 2048, 16, 32, 8, 8192, head_dim=64, tie_embeddings=True),
}


def _build() -> dict[str, ModelShape]:
    out: dict[str, ModelShape] = {}
    for key, shape in _BASE.items():
        if key != "llama-3.3-70b":
            out[key] = shape
        out[f"{key}-instruct"] = replace(shape, name=f"{shape.name} Instruct")
    return out


CATALOG: dict[str, ModelShape] = _build()


def catalog_names() -> list[str]:
    return sorted(CATALOG)


def lookup(name: str) -> ModelShape | None:
    """Case-insensitive; accepts 'meta-llama/Llama-3.1-8B-Instruct' and 'llama3.1-8b' too."""
    key = name.strip().lower().rsplit("/", 1)[-1].replace("_", "-").replace("meta-", "")
    key = key.replace("llama3", "llama-3") if key.startswith("llama3") else key
    return CATALOG.get(key)


def require(name: str) -> ModelShape:
    shape = lookup(name)
    if shape is None:
        raise UsageError(f"unknown model {name!r}: give a .gguf file, an HF folder, or one of "
                         f"{', '.join(catalog_names())}")
    return shape
