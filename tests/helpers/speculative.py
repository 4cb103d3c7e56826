"""Shared by the speculative-decoding tests: the three tiny models and a reply's tokens."""

from __future__ import annotations

from pathlib import Path

from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.engine import LlamaEngine
from tests.helpers.engine import write_tiny_gguf

GREEDY = SamplingSettings(temperature=0.0, max_tokens=48)
PROMPTS = ["Tell me a story about a cat.", "List three prime numbers and explain why.", "hi"]


def spec_models(folder: Path) -> dict[str, Path]:
    """A draft, a target computing the draft's function plus zero-output layers (so the draft always agrees with
    it), and another model that agrees by chance only."""
    return {
        "draft": write_tiny_gguf(folder / "draft.gguf", seed=0),
        "target": write_tiny_gguf(folder / "target.gguf", seed=0, extra_layers=3),
        "other": write_tiny_gguf(folder / "other.gguf", seed=11),
    }


def run_greedy(target: LlamaEngine, messages: list[Message], settings: SamplingSettings) -> tuple[list[int], object]:
    """A reply's tokens and its Generation."""
    result = target.generate(messages, settings)
    return list(target.last_completion_tokens), result
