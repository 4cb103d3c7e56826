"""The Llama 3.x herd by name (shapes from `llama_family.HERD`), so models can be planned unseen."""

from __future__ import annotations

from dataclasses import dataclass

from corral.convert.errors import UsageError
from corral.convert.llama_family import HERD, LlamaHParams


@dataclass(frozen=True)
class ModelShape:
    """A model not yet on disk: its display name and hyper-parameters."""

    name: str
    hparams: LlamaHParams


def _build() -> dict[str, ModelShape]:
    out: dict[str, ModelShape] = {}
    for key, (name, hparams) in HERD.items():
        if key != "llama-3.3-70b":
            out[key] = ModelShape(name, hparams)
        out[f"{key}-instruct"] = ModelShape(f"{name} Instruct", hparams)
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
