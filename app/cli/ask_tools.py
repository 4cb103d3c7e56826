"""`corral ask --tools FILE`: offer tools to the model and print the calls it asks for, as JSON. Nothing runs."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import click

from corral.app.cli import ui
from corral.app.cli.model_options import ModelArgs, stats_json
from corral.app.runtime.api import Message
from corral.app.runtime.tools import ToolSet, load_tools_file, parse_reply
from corral.convert.errors import Cancelled, ContextOverflow, UsageError


def read_tools_file(path: str) -> ToolSet:
    """The tools in `path` (a JSON list of OpenAI tool entries, or {"tools": [...], "builtin_tools": [...]})."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the tools file: {exc}", path=path) from None
    tools = load_tools_file(text, source=path)
    if not tools.active:
        raise UsageError("the tools file lists no tools", path=path)
    return tools


def answer_with_tools(engine: Any, args: ModelArgs, messages: list[Message], tools: ToolSet,
                      cancel: threading.Event, *, json_: bool) -> None:
    """Generate with `tools` offered; print calls as JSON lines (or one JSON object with --json)."""
    n_prompt = engine.count_prompt_tokens(messages, tools)
    if n_prompt >= engine.n_ctx:
        raise ContextOverflow(f"the prompt with its tools is {n_prompt} tokens but the context window is "
                              f"{engine.n_ctx} tokens (use --ctx to enlarge it)")
    result = engine.generate(messages, args.sampling, cancel=cancel, tools=tools)
    parsed = parse_reply(result.text, tools)
    stats = result.stats
    calls = [{"id": c.id, "name": c.name, "arguments": c.arguments_dict(), "kind": c.kind} for c in parsed.calls]
    invalid = [c.as_json() for c in parsed.invalid]
    if json_:
        click.echo(json.dumps({
            "model": engine.model_name,
            "text": parsed.content,
            "tool_calls": calls,
            "invalid_tool_calls": invalid,
            **stats_json(stats),
        }, ensure_ascii=False))
    else:
        if parsed.content:
            click.echo(parsed.content)
        for call in calls:
            click.echo(json.dumps(call, ensure_ascii=False))
        sys.stdout.flush()
    for bad in parsed.invalid:
        ui.warn(f"the model wrote a tool call corral could not read ({bad.error}); it was not run")
    if calls:
        ui.note(f"{len(calls)} tool call(s) printed; corral runs none of them", style="dim")
    if stats.stop_reason == "cancelled":
        raise Cancelled("interrupted; the reply so far is above")
