"""Conversations with tools as prompt text: the variables a GGUF's Jinja template takes, and corral's own
Llama 3.1 tool format for models whose template is missing or misbehaves.

The built-in format follows Llama 3.1's published prompt format (the model card and the official
chat template): `Environment: ipython` (plus a `Tools:` line for brave_search / wolfram_alpha) in
the system message, the knowledge/today dates, custom functions as indented JSON at the top of the
first user message with the instruction to answer in `{"name": ..., "parameters": ...}` form, the
assistant's earlier calls written back as the model wrote them (`<|eom_id|>` after a built-in call
in ipython mode), and tool results in `ipython` messages.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date
from typing import Any

from corral.app.runtime.api import Message
from corral.app.runtime.tools import CODE_INTERPRETER, ToolSet, call_prompt_text
from corral.convert.llama_family import END_HEADER_TEXT as END_HEADER
from corral.convert.llama_family import EOM_TEXT, EOT_TEXT
from corral.convert.llama_family import START_HEADER_TEXT as START_HEADER

KNOWLEDGE_DATE = "December 2023"
FUNCTIONS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


def needs_tool_format(messages: Sequence[Message], tools: ToolSet | None) -> bool:
    """Whether the conversation needs the tool-aware layout (tools offered, or calls/results in it)."""
    return bool(tools is not None and tools.active) or any(m.tool_calls or m.role == "ipython" for m in messages)


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as chat templates read them (`tool_calls` only on turns that have calls, arguments as dicts)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": c.arguments_dict()}}
                                  for c in m.tool_calls]
        out.append(item)
    return out


def template_tool_variables(tools: ToolSet | None) -> dict[str, Any]:
    """`tools` (None when there are none) and `builtin_tools` (only when offered: templates test `is defined`)."""
    variables: dict[str, Any] = {"tools": tools.function_dicts() if tools is not None and tools.functions else None}
    if tools is not None and tools.builtin:
        variables["builtin_tools"] = list(tools.builtin)
    return variables


def tools_chars(tools: ToolSet | None) -> int:
    """Characters of tool definitions (they count toward a template's output budget)."""
    return 0 if tools is None else sum(len(f) for f in tools.functions) + sum(len(b) for b in tools.builtin)


def _turn(role: str, content: str, end: str = EOT_TEXT) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n{content}{end}"


def builtin_llama31_prompt(messages: Sequence[Message], tools: ToolSet | None, *, bos_token: str,
                           date_string: str | None = None) -> str:
    """Llama 3.1's tool prompt format, ending with the assistant header."""
    tools = tools or ToolSet()
    today = date_string or date.today().strftime("%d %b %Y")
    rest = list(messages)
    system = rest.pop(0).content.strip() if rest and rest[0].role == "system" else ""
    head = []
    if tools.active:
        head.append("Environment: ipython\n")
    named = [b for b in tools.builtin if b != CODE_INTERPRETER]
    if tools.builtin:
        head.append("Tools: " + ", ".join(named) + "\n\n")
    head.append(f"Cutting Knowledge Date: {KNOWLEDGE_DATE}\nToday Date: {today}\n\n")
    parts = [bos_token, _turn("system", "".join(head) + system)]
    if tools.functions:
        first = rest.pop(0).content.strip() if rest and rest[0].role == "user" else ""
        listing = "".join(json.dumps(f, indent=4, ensure_ascii=False) + "\n\n" for f in tools.function_dicts())
        parts.append(_turn("user", FUNCTIONS_PREAMBLE + listing + first))
    for m in rest:
        if m.tool_calls:
            end = EOM_TEXT if tools.builtin else EOT_TEXT
            text = "".join(call_prompt_text(c, tools.builtin) for c in m.tool_calls)
            parts.append(_turn("assistant", text, end))
        elif m.role == "ipython":
            parts.append(_turn("ipython", m.content))
        else:
            parts.append(_turn(m.role, m.content.strip()))
    parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


__all__ = ["builtin_llama31_prompt", "needs_tool_format", "template_messages", "template_tool_variables",
           "tools_chars"]
