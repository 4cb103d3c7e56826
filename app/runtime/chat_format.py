"""Chat prompts: the GGUF's own template rendered in a guarded Jinja sandbox, or our built-in Llama 3 format.

Chat templates come from downloaded model files, so they are untrusted code. They render only in
jinja2's `ImmutableSandboxedEnvironment` (no attribute tricks, no mutation of lists or dicts), with
our own limits on top (`template_sandbox`): operators, filters and string methods that could build
huge strings, and containers about to be printed or compared, are checked before they run; the output
is capped, and a time budget is enforced from a per-thread trace hook (it works in worker threads
too, unlike signals). A template that breaks any rule is reported as a
`TemplateError`; `ChatFormatter` then falls back to the built-in Llama 3 format with a warning.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jinja2.exceptions import SecurityError, TemplateSyntaxError

from corral.app.runtime.api import Message
from corral.app.runtime.template_sandbox import (
    GuardedEnvironment,
    LimitExceeded,
    TemplateLimits,
    expanded_chars,
)
from corral.app.runtime.tool_prompt import (
    builtin_llama31_prompt,
    needs_tool_format,
    template_messages,
    template_tool_variables,
    tools_chars,
)
from corral.app.runtime.tools import ToolSet
from corral.convert.errors import TemplateError
from corral.convert.llama_family import BOS_TEXT, EOT_TEXT
from corral.convert.llama_family import END_HEADER_TEXT as END_HEADER
from corral.convert.llama_family import START_HEADER_TEXT as START_HEADER
from corral.convert.llama_family import STOP_TEXTS as LLAMA3_STOP_TEXTS

__all__ = [
    "BOS_TEXT", "EOT_TEXT", "LLAMA3_STOP_TEXTS", "ChatFormatter", "ChatTemplate", "TemplateLimits", "TemplateRaised",
    "builtin_llama3_prompt", "drop_oldest_turns", "expanded_chars",
]  # fmt: skip

DEFAULT_LIMITS = TemplateLimits()


class TemplateRaised(TemplateError):
    """The template itself rejected the conversation (`raise_exception`)."""


def builtin_llama3_prompt(messages: Sequence[Message], *, bos_token: str = BOS_TEXT) -> str:
    """Our own Llama 3 chat format: BOS, then header + trimmed content + <|eot_id|> per turn, then the reply header."""
    parts = [bos_token]
    for message in messages:
        parts.append(f"{START_HEADER}{message.role}{END_HEADER}\n\n{message.content.strip()}{EOT_TEXT}")
    parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt)[:200])


def _raise_exception(message: Any) -> None:
    raise TemplateRaised(f"the model's chat template rejected the conversation: {message}")


class _Deadline:
    """A trace hook that stops the current thread's Python code once a time budget is spent."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > self.end:
            raise LimitExceeded(f"chat template took longer than {self.seconds:g} s")
        return self


class ChatTemplate:
    """A chat template compiled in the guarded sandbox."""

    def __init__(self, source: str, limits: TemplateLimits = DEFAULT_LIMITS) -> None:
        if not isinstance(source, str) or not source.strip():
            raise TemplateError("the chat template is empty")
        if len(source) > limits.max_template_chars:
            raise TemplateError(f"the chat template is {len(source)} characters (limit {limits.max_template_chars})")
        self.limits = limits
        self._env = GuardedEnvironment(limits)
        try:
            self._template = self._env.from_string(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"the chat template does not compile: {exc.message} (line {exc.lineno})") from None
        except (RecursionError, MemoryError):
            raise TemplateError("the chat template is too complex to compile") from None

    def render(self, messages: Sequence[Message], *, bos_token: str, eos_token: str,
               add_generation_prompt: bool = True, tools: ToolSet | None = None) -> str:
        """The prompt text for `messages` (and `tools`); raise TemplateError on any failure or limit."""
        given = sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in messages)
        budget = self.limits.base_output_chars + self.limits.output_per_input * (given + tools_chars(tools))
        self._env.max_value_chars = budget
        variables = {
            "messages": template_messages(messages),
            "bos_token": bos_token,
            "eos_token": eos_token,
            "add_generation_prompt": add_generation_prompt,
            "raise_exception": _raise_exception,
            "strftime_now": _strftime_now,
            **template_tool_variables(tools),
            "functions": None,
            "function_call": None,
            "tool_choice": None,
        }
        chunks: list[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(_Deadline(self.limits.max_seconds))
        try:
            for chunk in self._template.generate(**variables):
                size += len(chunk)
                if size > budget:
                    raise LimitExceeded(f"chat template output passed {budget} characters")
                chunks.append(chunk)
        except TemplateError:
            raise
        except SecurityError as exc:
            raise TemplateError(f"the chat template tried an unsafe operation: {exc}") from None
        except RecursionError:
            raise TemplateError("the chat template recursed too deeply") from None
        except MemoryError:
            raise TemplateError("the chat template ran out of memory") from None
        except Exception as exc:  # noqa: BLE001 - any failure of untrusted code is a template problem
            raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.settrace(previous)
        return "".join(chunks)


@dataclass
class ChatFormatter:
    """Turns a conversation into prompt text: the model's template when it behaves, else our Llama 3 format."""

    template_source: str | None
    bos_token: str = BOS_TEXT
    eos_token: str = EOT_TEXT
    limits: TemplateLimits = DEFAULT_LIMITS
    warnings: list[str] = field(default_factory=list)
    _template: ChatTemplate | None = field(default=None, init=False, repr=False)
    _fallback: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.template_source is None:
            self._use_fallback("the model has no chat template")
            return
        try:
            self._template = ChatTemplate(self.template_source, self.limits)
        except TemplateError as exc:
            self._use_fallback(str(exc))

    @property
    def using_builtin(self) -> bool:
        return self._fallback

    def _ignores_tools(self, messages: Sequence[Message], tools: ToolSet | None) -> bool:
        """A template that never reads `tools` / `tool_calls` would drop them silently: use our format then."""
        source = self.template_source or ""
        if tools is not None and tools.active and "tools" not in source:
            return True
        return any(m.tool_calls for m in messages) and "tool_calls" not in source

    def _use_fallback(self, why: str) -> None:
        self._fallback = True
        self._template = None
        self.warnings.append(f"{why}; using corral's built-in Llama 3 chat format")

    def format(self, messages: Sequence[Message], tools: ToolSet | None = None) -> str:
        """Prompt text ending with the assistant header; falls back (once, with a warning) on template failure."""
        if self._template is not None and not self._ignores_tools(messages, tools):
            try:
                return self._template.render(messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                             tools=tools)
            except TemplateRaised:
                raise
            except TemplateError as exc:
                self._use_fallback(str(exc))
        if needs_tool_format(messages, tools):
            return builtin_llama31_prompt(messages, tools, bos_token=self.bos_token)
        return builtin_llama3_prompt(messages, bos_token=self.bos_token)


def drop_oldest_turns(messages: Sequence[Message], fits: Callable[[Sequence[Message]], bool]) -> tuple[list[Message], int]:
    """Drop the oldest non-system messages until `fits` holds or one message is left; return (kept, dropped)."""
    kept = list(messages)
    dropped = 0
    while not fits(kept):
        removable = [i for i, m in enumerate(kept) if m.role != "system"]
        if len(removable) <= 1:
            break
        del kept[removable[0]]
        dropped += 1
    return kept, dropped
