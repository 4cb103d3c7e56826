"""The contract between front ends (`ask`, the TUI) and the engine that runs a model.

The real engine (`corral.app.runtime.engine.LlamaEngine`, llama-cpp-python) and test fakes both
implement `ChatEngine`; front ends depend only on this module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from corral.app.runtime.tools import ToolCall
    from corral.offload.plan import Plan

Role = Literal["system", "user", "assistant", "ipython"]  # ipython: a tool's result (Llama 3.1)
# tool_call: with tools offered, the model ended its message with <|eom_id|>, expecting a tool's result next
StopReason = Literal["stop", "length", "cancelled", "tool_call"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn that called tools


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample a reply; the defaults here are the CLI's and the TUI's defaults."""

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
    drafted_tokens: int = 0  # speculative decoding: tokens the draft model proposed
    accepted_tokens: int = 0  # ... and how many of them the target accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

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


@dataclass(frozen=True)
class FitResult:
    """A conversation cut down to fit the context: what was kept and what was dropped."""

    messages: list[Message]
    prompt_tokens: int
    dropped_messages: int = 0
    dropped_tokens: int = 0

    @property
    def truncated(self) -> bool:
        return self.dropped_messages > 0 or self.dropped_tokens > 0


class ChatEngine(Protocol):
    """A loaded model that turns a conversation into a streamed reply."""

    model_name: str
    n_ctx: int
    plan: Plan | None  # the offload plan it was loaded with (None: the engine has none)
    warnings: list[str]  # what the user should know about this model and its plan (engines may add more)

    def count_prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens the formatted conversation takes (before the reply)."""
        ...

    def fit_messages(self, messages: Sequence[Message], reserve: int) -> FitResult:
        """Drop the oldest text until the prompt leaves `reserve` tokens of the context for the reply."""
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
