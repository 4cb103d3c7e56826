"""Requests of the OpenAI-compatible API, validated into corral's own values (BadRequest on anything wrong).

Unknown fields are ignored (clients send many); known fields with the wrong type or range are
refused with a message naming the field, as OpenAI's API does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.tools import ToolCall, ToolSet, tool_set
from corral.convert.errors import UsageError

MAX_STOPS = 4
MAX_STOP_CHARS = 256


class BadRequest(Exception):
    """A request the API refuses: HTTP status, message and the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Sampling:
    settings: SamplingSettings
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    tools: ToolSet | None
    sampling: Sampling


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    sampling: Sampling


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object")
    return doc


def _number(doc: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"'{key}' must be a number", key)
    if not low <= value <= high:
        raise BadRequest(f"'{key}' must be between {low:g} and {high:g}, got {value}", key)
    return float(value)


def _integer(doc: dict[str, Any], key: str, low: int) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{key}' must be an integer", key)
    if value < low:
        raise BadRequest(f"'{key}' must be at least {low}, got {value}", key)
    return value


def _sampling(doc: dict[str, Any], defaults: SamplingSettings) -> Sampling:
    changes: dict[str, Any] = {}
    temperature = _number(doc, "temperature", 0.0, 2.0)
    if temperature is not None:
        changes["temperature"] = temperature
    top_p = _number(doc, "top_p", 0.0, 1.0)
    if top_p is not None:
        changes["top_p"] = max(top_p, 1e-6)
    max_tokens = _integer(doc, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(doc, "max_tokens", 1)
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    seed = _integer(doc, "seed", -(2**63))
    if seed is not None:
        changes["seed"] = seed
    n = _integer(doc, "n", 1)
    if n is not None and n != 1:
        raise BadRequest("'n' must be 1 (one model, one reply per request)", "n")
    stop = doc.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"'stop' takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                         "characters", "stop")
    stream = doc.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = doc.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return Sampling(replace(defaults, **changes), stops, bool(stream), bool(options.get("include_usage")))


def _content(value: Any, where: str) -> str:
    """Message content: a string, or a list of text parts (other part types are refused)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}[{i}] must be a text part ({{'type': 'text', 'text': ...}}); this model "
                                 "reads text only", where)
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"{where} must be a string or a list of text parts", where)


def _tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a list", where)
    calls = []
    for i, entry in enumerate(value):
        fn = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"{where}[{i}].function must be an object with a name", where)
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        try:
            decoded = json.loads(arguments) if isinstance(arguments, str) else None
        except json.JSONDecodeError:
            decoded = None
        if not isinstance(decoded, dict):
            raise BadRequest(f"{where}[{i}].function.arguments must be a JSON object (as a string)", where)
        calls.append(ToolCall(fn["name"], arguments, str(entry.get("id") or f"call_{i}")))
    return tuple(calls)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "ipython",
          "ipython": "ipython"}


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object", "messages")
        role = m.get("role")
        if role not in _ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(sorted(_ROLES))}; got {role!r}", "messages")
        content = _content(m.get("content"), f"{where}.content")
        calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls") if m.get("tool_calls") else ()
        if calls and role != "assistant":
            raise BadRequest(f"{where}: only assistant messages carry tool_calls", "messages")
        out.append(Message(_ROLES[role], content, calls))  # type: ignore[arg-type]
    return tuple(out)


def _tools(doc: dict[str, Any]) -> ToolSet | None:
    try:
        tools = tool_set(doc.get("tools"), doc.get("builtin_tools"))
    except UsageError as exc:
        raise BadRequest(str(exc), "tools") from None
    choice = doc.get("tool_choice", "auto")
    if choice in ("auto", "required", None):
        pass
    elif choice == "none":
        return None
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        try:
            tools = tools.only(choice["function"]["name"])
        except UsageError as exc:
            raise BadRequest(str(exc), "tool_choice") from None
    else:
        raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', "
                         "'function': {'name': ...}}", "tool_choice")
    return tools if tools.active else None


def chat_request(doc: dict[str, Any], defaults: SamplingSettings) -> ChatRequest:
    """A /v1/chat/completions body."""
    messages = _messages(doc.get("messages"))
    return ChatRequest(messages, _tools(doc), _sampling(doc, defaults))


def completion_request(doc: dict[str, Any], defaults: SamplingSettings) -> CompletionRequest:
    """A /v1/completions body (one prompt)."""
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string", "prompt")
    if doc.get("echo"):
        raise BadRequest("'echo' is not supported", "echo")
    return CompletionRequest(prompt, _sampling(doc, defaults))


__all__ = ["BadRequest", "ChatRequest", "CompletionRequest", "Sampling", "chat_request", "completion_request",
           "parse_body"]
