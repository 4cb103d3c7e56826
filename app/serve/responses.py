"""OpenAI response shapes: chat completions and their stream chunks, text completions, errors."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from corral.app.runtime.api import GenerationStats
from corral.app.runtime.tools import ParsedReply, ToolCall


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


def finish_reason(stats: GenerationStats, *, stopped_by_string: bool, calls: bool) -> str:
    """OpenAI's finish_reason: tool_calls, stop (end of turn or a stop string) or length."""
    if calls:
        return "tool_calls"
    if stats.stop_reason == "length" and not stopped_by_string:
        return "length"
    return "stop"


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments}}
    if index is not None:
        item = {"index": index, **item}
    return item


def chat_message(parsed: ParsedReply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content if (parsed.content or not parsed.calls)
                               else None}
    if parsed.calls:
        message["tool_calls"] = [tool_call_json(c) for c in parsed.calls]
    if parsed.invalid:
        message["invalid_tool_calls"] = [c.as_json() for c in parsed.invalid]  # corral's addition: never executed
    return message


def chat_completion(cid: str, model: str, parsed: ParsedReply, reason: str, stats: GenerationStats) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": chat_message(parsed), "logprobs": None, "finish_reason": reason}],
            "usage": usage(stats)}


def chat_chunk(cid: str, model: str, delta: dict[str, Any], reason: str | None = None,
               stats: GenerationStats | None = None) -> str:
    doc: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
    if stats is not None:
        doc["usage"] = usage(stats)
    return sse(doc)


def text_completion(cid: str, model: str, text: str, reason: str | None, stats: GenerationStats | None,
                    *, chunk: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
    if stats is not None:
        doc["usage"] = usage(stats)
    elif not chunk:
        doc["usage"] = None
    return doc


def sse(doc: Any) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"

__all__ = ["DONE", "chat_chunk", "chat_completion", "chat_message", "error_body", "finish_reason", "new_id", "sse",
           "text_completion", "tool_call_json", "usage"]
