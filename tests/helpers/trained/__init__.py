"""Trained miniature Llama 3.x models for quality and speed tests (built once, cached; see build.py).

`small` (2 layers, 64 wide) and `base` (4 layers, 256 wide, GQA 4/2) learn the same built-in training text with
the full Llama 3 vocabulary, so either drafts for the other; `base-padded` is `base` with inert layers, a larger
and slower model with the same function.
"""

from __future__ import annotations

from pathlib import Path

from . import build as _build
from .build import MODELS, NAMES, PADDED, cache_key, cache_root, gguf, hf_dir, quality
from .pad import pad_layers

__all__ = ["MODELS", "NAMES", "PADDED", "cache_key", "cache_root", "pad_layers", "quality", "trained_gguf",
           "trained_hf", "trained_models"]


def trained_hf(name: str) -> Path:
    """The Hugging Face checkpoint folder of trained model `name` (trained on first use)."""
    return hf_dir(_build.build(name), name)


def trained_gguf(name: str, outtype: str = "f32") -> Path:
    """Trained model `name` converted by corral to a GGUF of `outtype` (f32, bf16, f16, q8_0)."""
    return gguf(name, outtype)


def trained_models() -> dict[str, Path]:
    """Every trained model's Hugging Face folder, by name."""
    return {name: trained_hf(name) for name in NAMES}
