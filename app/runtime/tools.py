"""Llama 3.1 tool use: tool definitions in, the model's calls out.

Llama 3.1 (model card, llama-models' prompt format) knows two kinds of tools:
- custom functions, described as JSON in the system or first user message; the model answers with
  `{"name": ..., "parameters": {...}}`, sometimes after `<|python_tag|>`, and ends the turn with
  `<|eot_id|>` (or `<|eom_id|>` when `Environment: ipython` is on);
- built-in tools, named on a `Tools:` line of the system message (`brave_search`, `wolfram_alpha`;
  `code_interpreter` is implied by `Environment: ipython`): the model answers `<|python_tag|>` then
  `brave_search.call(query="...")`, or raw Python for the interpreter, and ends with `<|eom_id|>`.
Results go back in `ipython` messages. Nothing here runs a call: `parse_reply` only reports what the
model asked for, and a call that does not parse (cut short, bad JSON, unknown tool) is reported as
invalid, never guessed at.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from corral.convert.errors import UsageError

PYTHON_TAG = "<|python_tag|>"
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
CODE_INTERPRETER = "code_interpreter"
_BUILTIN_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\.call\((.*)\)\s*$", re.DOTALL)
_FUNCTION_TAG = re.compile(r"<function=([^>]+)>(.*?)</function>", re.DOTALL)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for; `arguments` is a JSON object as text (as OpenAI's API carries it)."""

    name: str
    arguments: str
    id: str = ""
    kind: Literal["function", "builtin"] = "function"

    def arguments_dict(self) -> dict[str, Any]:
        value = json.loads(self.arguments)
        return value if isinstance(value, dict) else {}

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "kind": self.kind,
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class InvalidToolCall:
    """Model output that looked like a tool call but could not be read as one."""

    text: str
    error: str

    def as_json(self) -> dict[str, str]:
        return {"text": self.text, "error": self.error}


@dataclass(frozen=True)
class ToolSet:
    """The tools offered to the model: custom functions (OpenAI's `tools` entries, as JSON text) and built-ins."""

    functions: tuple[str, ...] = ()
    builtin: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.functions or self.builtin)

    def function_dicts(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.functions]

    def function_names(self) -> list[str]:
        return [d["function"]["name"] for d in self.function_dicts()]

    def only(self, name: str) -> ToolSet:
        """Just the function called `name` (OpenAI's `tool_choice: {"function": {"name": ...}}`)."""
        kept = tuple(f for f, n in zip(self.functions, self.function_names()) if n == name)
        if not kept:
            raise UsageError(f"tool_choice names {name!r}, which is not among the tools")
        return ToolSet(kept, ())


def _check_function(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise UsageError(f"{where} must be an object")
    if entry.get("type", "function") != "function":
        raise UsageError(f"{where}.type must be 'function'")
    fn = entry.get("function", entry if "name" in entry else None)
    if not isinstance(fn, dict):
        raise UsageError(f"{where}.function must be an object with a name")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.'")
    description = fn.get("description", "")
    if not isinstance(description, str):
        raise UsageError(f"{where}.function.description must be a string")
    parameters = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise UsageError(f"{where}.function.parameters must be a JSON Schema object")
    clean: dict[str, Any] = {"name": name}
    if description:
        clean["description"] = description
    clean["parameters"] = parameters
    return {"type": "function", "function": clean}


def tool_set(functions: Any = None, builtin: Any = None, *, where: str = "tools") -> ToolSet:
    """Validate OpenAI-style `tools` entries and built-in tool names into a ToolSet (UsageError on bad input)."""
    if functions is None:
        functions = []
    if not isinstance(functions, list):
        raise UsageError(f"{where} must be a list")
    if len(functions) > MAX_TOOLS:
        raise UsageError(f"{where} has {len(functions)} entries (at most {MAX_TOOLS})")
    checked = [_check_function(entry, f"{where}[{i}]") for i, entry in enumerate(functions)]
    names = [c["function"]["name"] for c in checked]
    if len(set(names)) != len(names):
        raise UsageError(f"{where}: two tools have the same name")
    builtin = [] if builtin is None else builtin
    if not isinstance(builtin, list) or not all(isinstance(b, str) for b in builtin):
        raise UsageError("builtin_tools must be a list of names")
    unknown = [b for b in builtin if b not in BUILTIN_TOOLS]
    if unknown:
        raise UsageError(f"unknown built-in tool {unknown[0]!r} (Llama 3.1 has {', '.join(BUILTIN_TOOLS)})")
    clash = set(names) & set(builtin)
    if clash:
        raise UsageError(f"{where}: {sorted(clash)[0]!r} is the name of a built-in tool")
    return ToolSet(tuple(json.dumps(c, ensure_ascii=False) for c in checked), tuple(dict.fromkeys(builtin)))


def load_tools_file(text: str, *, source: str = "tools file") -> ToolSet:
    """A tools file: a JSON list of OpenAI tool entries, or {"tools": [...], "builtin_tools": [...]}."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if isinstance(doc, list):
        return tool_set(doc)
    if isinstance(doc, dict) and set(doc) <= {"tools", "builtin_tools"}:
        return tool_set(doc.get("tools"), doc.get("builtin_tools"))
    raise UsageError(f"{source} must be a list of tools or an object with 'tools' and/or 'builtin_tools'")


# -- reading the model's reply --------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedReply:
    """A reply split into text for the user and the tool calls it asks for."""

    content: str
    calls: tuple[ToolCall, ...] = ()
    invalid: tuple[InvalidToolCall, ...] = field(default=())

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)


def looks_like_call(text: str) -> bool:
    """Whether streamed text so far may be the start of a tool call (so a server should hold it back)."""
    head = text.lstrip()
    if not head:
        return True
    return head.startswith((PYTHON_TAG, "{", "<function")) or PYTHON_TAG.startswith(head) or "<function".startswith(head)


def _literal_kwargs(args: str) -> dict[str, Any]:
    """`query="x", n=3` -> {"query": "x", "n": 3}: keyword arguments with literal values only (never evaluated)."""
    tree = ast.parse(f"f({args})", mode="eval")
    call = tree.body
    if not isinstance(call, ast.Call) or call.args:
        raise ValueError("built-in tool calls take keyword arguments only")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError("built-in tool calls cannot use **kwargs")
        out[kw.arg] = ast.literal_eval(kw.value)
    return out


def _call_from_object(obj: Any, tools: ToolSet, raw: str) -> ToolCall | InvalidToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return InvalidToolCall(raw, "a tool call must be a JSON object with a string 'name'")
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return InvalidToolCall(raw, "the call's arguments are a string that is not JSON")
    if not isinstance(args, dict):
        return InvalidToolCall(raw, "the call's parameters must be a JSON object")
    name = obj["name"]
    known = tools.function_names()
    if name in tools.builtin:
        return ToolCall(name, json.dumps(args, ensure_ascii=False), kind="builtin")
    if name not in known:
        return InvalidToolCall(raw, f"the model called {name!r}, which is not among the tools "
                                    f"({', '.join(known + list(tools.builtin)) or 'none'})")
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _json_calls(body: str, tools: ToolSet) -> list[ToolCall | InvalidToolCall]:
    """One or more JSON call objects separated by whitespace or ';' (Llama 3.1 sometimes emits several)."""
    decoder = json.JSONDecoder()
    found: list[ToolCall | InvalidToolCall] = []
    pos = 0
    while True:
        while pos < len(body) and body[pos] in " \t\r\n;,":
            pos += 1
        if pos >= len(body):
            return found
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as exc:
            rest = body[pos:]
            why = (f"invalid JSON: {exc.msg}" if rest.rstrip().endswith("}")
                   else f"the call is cut short (incomplete JSON: {exc.msg})")
            found.append(InvalidToolCall(rest, why))
            return found
        found.append(_call_from_object(obj, tools, body[pos:end]))
        pos = end


def _builtin_call(body: str, tools: ToolSet) -> ToolCall | InvalidToolCall | None:
    match = _BUILTIN_CALL.match(body)
    if not match or match.group(1) not in BUILTIN_TOOLS:
        return None
    name = match.group(1)
    if name not in tools.builtin:
        return InvalidToolCall(body, f"the model called the built-in tool {name!r}, which was not offered")
    try:
        args = _literal_kwargs(match.group(2))
    except (SyntaxError, ValueError) as exc:
        return InvalidToolCall(body, f"could not read the arguments of {name}.call(...): {exc}")
    return ToolCall(name, json.dumps(args, ensure_ascii=False), kind="builtin")


def parse_reply(text: str, tools: ToolSet) -> ParsedReply:
    """Split a reply into content and calls (custom JSON, `<function=...>`, built-in `x.call(...)`, raw Python)."""
    if not tools.active:
        return ParsedReply(text.replace(PYTHON_TAG, ""))
    stripped = text.strip()
    tagged = stripped.startswith(PYTHON_TAG)
    body = stripped[len(PYTHON_TAG):].strip() if tagged else stripped
    items: list[ToolCall | InvalidToolCall] = []
    content = ""
    if tagged or body.startswith("{"):
        builtin = _builtin_call(body, tools)
        if builtin is not None:
            items = [builtin]
        elif body.startswith("{"):
            items = _json_calls(body, tools)
        elif tagged and CODE_INTERPRETER in tools.builtin:
            items = [ToolCall(CODE_INTERPRETER, json.dumps({"code": body}, ensure_ascii=False), kind="builtin")]
        elif tagged:
            items = [InvalidToolCall(body, "the model wrote code after <|python_tag|> but code_interpreter "
                                           "was not offered")]
    elif _FUNCTION_TAG.search(stripped):
        content = _FUNCTION_TAG.sub("", stripped).strip()
        for match in _FUNCTION_TAG.finditer(stripped):
            try:
                args = json.loads(match.group(2) or "{}")
            except json.JSONDecodeError as exc:
                items.append(InvalidToolCall(match.group(0), f"invalid JSON: {exc.msg}"))
                continue
            items.append(_call_from_object({"name": match.group(1), "parameters": args}, tools, match.group(0)))
    else:
        return ParsedReply(text)
    calls = tuple(c for c in items if isinstance(c, ToolCall))
    calls = tuple(ToolCall(c.name, c.arguments, f"call_{i}", c.kind) for i, c in enumerate(calls))
    invalid = tuple(c for c in items if isinstance(c, InvalidToolCall))
    if not calls and not invalid:
        return ParsedReply(text)
    if invalid and not calls:
        content = text.replace(PYTHON_TAG, "").strip()
    return ParsedReply(content, calls, invalid)


def builtin_call_text(name: str, arguments: dict[str, Any]) -> str:
    """How an assistant's built-in call is written back into the prompt: `name.call(k="v", ...)`."""
    if name == CODE_INTERPRETER and set(arguments) == {"code"}:
        return str(arguments["code"])
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
    return f"{name}.call({args})"


def call_prompt_text(call: ToolCall, builtin: Sequence[str]) -> str:
    """An assistant tool call as the model writes it (without header or end token)."""
    args = call.arguments_dict()
    if call.name in builtin:
        return PYTHON_TAG + builtin_call_text(call.name, args)
    return json.dumps({"name": call.name, "parameters": args}, ensure_ascii=False)


__all__ = ["BUILTIN_TOOLS", "CODE_INTERPRETER", "PYTHON_TAG", "InvalidToolCall", "ParsedReply", "ToolCall", "ToolSet",
           "builtin_call_text", "call_prompt_text", "load_tools_file", "looks_like_call", "parse_reply", "tool_set"]
