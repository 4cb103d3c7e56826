"""Tool calls in the chat: shown literally, never run; the user types the tool's result as the next turn."""

from __future__ import annotations

import json

from corral.app.runtime.api import Message
from corral.app.runtime.tools import ParsedReply, ToolSet, parse_reply

# Tool results are stored as user turns with this prefix (the store's roles are user/assistant only).
TOOL_RESULT_PREFIX = "[tool result]\n"
TOOL_PENDING = ("tool call not run: type its result and press Enter to send it as the tool's output, "
                "or press escape to write a normal message instead")
TOOL_DISMISSED = "tool call dismissed: the next message is a normal one"


def calls_in(text: str, tools: ToolSet | None) -> ParsedReply | None:
    """The reply's tool calls (valid or not) when tools are offered and it has any; else None."""
    if tools is None or not tools.active:
        return None
    parsed = parse_reply(text, tools)
    return parsed if parsed.calls or parsed.invalid else None


def describe_calls(parsed: ParsedReply) -> str:
    """Each call as plain text: `tool call (not run): NAME {json arguments}` or `invalid call: reason`."""
    lines = [f"tool call (not run): {c.name} {c.arguments}" for c in parsed.calls]
    lines += [f"invalid call: {bad.error}: {json.dumps(bad.text, ensure_ascii=False)}" for bad in parsed.invalid]
    return "\n".join(lines)


def reply_message(text: str, tools: ToolSet | None) -> Message:
    """An assistant turn for the prompt: with tools offered, its calls go back as `tool_calls`."""
    parsed = calls_in(text, tools)
    if parsed is None or not parsed.calls:
        return Message("assistant", text)
    return Message("assistant", parsed.content, tool_calls=parsed.calls)
