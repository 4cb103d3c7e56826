"""The contract between front ends (`ask`, the TUI) and the engine that runs a model.

The real engine (`corral.app.runtime.engine.LlamaEngine`, llama-cpp-python) and test fakes both
implement `ChatEngine`; front ends depend only on this module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]
StopReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1024  # 0 = until the context is full
    seed: int | None = None

    def max_new_tokens(self, room: int) -> int:
        """Most tokens to generate when `room` tokens of the context are left after the prompt."""
        return room if self.max_tokens <= 0 else min(self.max_tokens, room)


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float
    generation_seconds: float
    stop_reason: StopReason

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over generation time only."""
        return self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0


@dataclass(frozen=True)
class Generation:
    text: str
    stats: GenerationStats


class ChatEngine(Protocol):
    """A loaded model that turns a conversation into a streamed reply."""

    model_name: str
    n_ctx: int

    def count_prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens the formatted conversation takes (before the reply)."""
        ...

    def generate(
        self,
        messages: Sequence[Message],
        settings: SamplingSettings,
        *,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Generate the assistant reply; call `on_text` with each new piece; stop promptly when `cancel` is set."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...
