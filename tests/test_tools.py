"""Llama 3.1 tool use: definitions, the prompt format (ours vs Meta's template), parsing calls, the engine's
tool tokens, and `corral ask --tools`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import corral.app.runtime.engine as engine_mod
from corral.app.cli.main import cli
from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.chat_format import ChatFormatter
from corral.app.runtime.engine import LlamaEngine, load_engine
from corral.app.runtime.tool_prompt import builtin_llama31_prompt
from corral.app.runtime.tools import (
    PYTHON_TAG,
    ToolCall,
    ToolSet,
    load_tools_file,
    looks_like_call,
    parse_reply,
    tool_set,
)
from corral.convert.errors import UsageError
from corral.convert.llama_family import BOS_TEXT
from tests.helpers.engine import cpu_plan, write_tiny_gguf
from tests.helpers.tools import TIME, WEATHER, official_llama31_template

TOOLS = tool_set([WEATHER, TIME])
BUILTIN = tool_set([WEATHER], ["brave_search", "wolfram_alpha", "code_interpreter"])
GREEDY = SamplingSettings(temperature=0.0, max_tokens=8)


# -- definitions --------------------------------------------------------------------------------


@pytest.mark.parametrize(("functions", "builtin", "message"), [
    ("nope", None, "must be a list"),
    ([{"type": "retrieval"}], None, "type must be 'function'"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "name must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "parameters must be"),
    ([WEATHER, WEATHER], None, "same name"),
    (None, ["shell"], "unknown built-in tool 'shell'"),
    ([{"type": "function", "function": {"name": "brave_search"}}], ["brave_search"], "built-in tool"),
])
def test_bad_tool_definitions_are_refused_with_a_reason(functions: Any, builtin: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        tool_set(functions, builtin)


def test_tools_file_forms() -> None:
    assert load_tools_file(json.dumps([WEATHER])).function_names() == ["get_weather"]
    both = load_tools_file(json.dumps({"tools": [TIME], "builtin_tools": ["brave_search"]}))
    assert both.function_names() == ["get_time"] and both.builtin == ("brave_search",)
    with pytest.raises(UsageError, match="not valid JSON"):
        load_tools_file("[{")
    with pytest.raises(UsageError, match="must be a list of tools"):
        load_tools_file('{"functions": []}')


# -- parsing the model's reply --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name", "args", "kind"), [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "get_weather", {"city": "Paris"}, "function"),
    (PYTHON_TAG + '{"name": "get_weather", "parameters": {"city": "Paris"}}', "get_weather", {"city": "Paris"},
     "function"),
    ('{"type": "function", "name": "get_time", "parameters": {}}', "get_time", {}, "function"),
    ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', "get_weather", {"city": "Oslo"}, "function"),
    ('<function=get_weather>{"city": "Rome"}</function>', "get_weather", {"city": "Rome"}, "function"),
    (PYTHON_TAG + 'brave_search.call(query="gold price")', "brave_search", {"query": "gold price"}, "builtin"),
    (PYTHON_TAG + 'wolfram_alpha.call(query="100th decimal of pi")', "wolfram_alpha",
     {"query": "100th decimal of pi"}, "builtin"),
    (PYTHON_TAG + "print(2 + 2)", "code_interpreter", {"code": "print(2 + 2)"}, "builtin"),
])
def test_calls_are_read(text: str, name: str, args: dict[str, Any], kind: str) -> None:
    parsed = parse_reply(text, BUILTIN if kind == "builtin" else TOOLS)
    assert [(c.name, c.arguments_dict(), c.kind) for c in parsed.calls] == [(name, args, kind)]
    assert parsed.calls[0].id == "call_0"
    assert parsed.invalid == () and parsed.content == ""


def test_several_json_calls_in_one_reply() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "A"}}; {"name": "get_time", "parameters": {}}'
    parsed = parse_reply(text, TOOLS)
    assert [(c.id, c.name) for c in parsed.calls] == [("call_0", "get_weather"), ("call_1", "get_time")]


@pytest.mark.parametrize(("text", "error"), [
    ('{"name": "get_weather", "parameters": {"city": "Par', "cut short"),
    ('{"name": "get_weather", "parameters": {"city": Paris}}', "invalid JSON"),
    ('{"name": "delete_everything", "parameters": {}}', "not among the tools"),
    ('{"name": "get_weather", "parameters": [1, 2]}', "must be a JSON object"),
    ('{"parameters": {}}', "string 'name'"),
    (PYTHON_TAG + 'brave_search.call(query=open("/etc/passwd").read())', "could not read the arguments"),
    (PYTHON_TAG + "import os; os.system('rm -rf /')", "code_interpreter was not offered"),
])
def test_bad_calls_are_reported_not_guessed(text: str, error: str) -> None:
    parsed = parse_reply(text, BUILTIN if "brave_search" in text else TOOLS)
    assert parsed.calls == ()
    assert len(parsed.invalid) == 1 and error in parsed.invalid[0].error
    assert parsed.content == text.replace(PYTHON_TAG, "")  # the user still sees what the model wrote


def test_plain_text_is_content_and_without_tools_nothing_is_a_call() -> None:
    assert parse_reply("The weather is fine.", TOOLS) == parse_reply("The weather is fine.", TOOLS)
    assert parse_reply("The weather is fine.", TOOLS).calls == ()
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert parse_reply(call, ToolSet()).content == call and parse_reply(call, ToolSet()).calls == ()


def test_looks_like_call_holds_back_only_what_may_be_a_call() -> None:
    assert all(looks_like_call(t) for t in ("", " ", "{", '{"na', "<|pyth", PYTHON_TAG + "x", "<func"))
    assert not any(looks_like_call(t) for t in ("Hello", " The", "1 + 1"))


# -- the prompt --------------------------------------------------------------------------------------

CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Weather in Paris?"),
    Message("assistant", "", (ToolCall("get_weather", '{"city": "Paris"}', "call_0"),)),
]


@pytest.mark.parametrize(("tools", "messages"), [
    (tool_set([WEATHER]), CONVERSATION[:2]),
    (tool_set([WEATHER]), CONVERSATION),
    (tool_set([WEATHER], ["brave_search", "wolfram_alpha"]), CONVERSATION[:2]),
    (tool_set([], ["brave_search", "code_interpreter"]), CONVERSATION[1:2]),
    (tool_set([WEATHER, TIME]), CONVERSATION[1:2] + [Message("assistant", "Sunny."), Message("user", "Thanks")]),
])
def test_builtin_format_is_meta_templates_format(tools: ToolSet, messages: list[Message]) -> None:
    """Our fallback renders what Meta's own Llama 3.1 template renders, character for character."""
    official = ChatFormatter(official_llama31_template(), bos_token=BOS_TEXT)
    theirs = official.format(messages, tools)
    assert not official.using_builtin
    ours = builtin_llama31_prompt(messages, tools, bos_token=BOS_TEXT, date_string="26 Jul 2024")
    assert ours == theirs
    assert "Environment: ipython\n" in ours


def test_tool_results_go_in_ipython_turns() -> None:
    prompt = builtin_llama31_prompt(CONVERSATION + [Message("ipython", '{"temp_c": 21}')], tool_set([WEATHER]),
                                    bos_token=BOS_TEXT, date_string="1 Jan 2025")
    assert prompt.endswith('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
                           '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp_c": 21}<|eot_id|>'
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    builtin = builtin_llama31_prompt([Message("user", "gold?"), Message("assistant", "", (
        ToolCall("brave_search", '{"query": "gold"}'),))], tool_set([], ["brave_search"]), bos_token=BOS_TEXT)
    assert '<|python_tag|>brave_search.call(query="gold")<|eom_id|>' in builtin


def test_a_template_that_ignores_tools_gets_our_format() -> None:
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    formatter = ChatFormatter(plain, bos_token=BOS_TEXT)
    with_tools = formatter.format(CONVERSATION[:2], tool_set([WEATHER]))
    assert '"name": "get_weather"' in with_tools and "Environment: ipython" in with_tools
    assert formatter.format(CONVERSATION[:2]) == "system: Be brief.\nuser: Weather in Paris?\n"
    assert not formatter.using_builtin  # not a failure of the template, no warning
    assert formatter.warnings == []


# -- the engine: <|python_tag|> kept, <|eom_id|> a stop of its own ---------------------------------------


@pytest.fixture(scope="module")
def tagging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaEngine]:
    """A model that always says <|python_tag|> (id 128010)."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("tag") / "tag.gguf", dominant_token=128010)
    with load_engine(path, plan=cpu_plan()) as eng:
        yield eng


def test_python_tag_is_kept_only_with_tools(tagging: LlamaEngine) -> None:
    msgs = [Message("user", "hi")]
    with_tools = tagging.generate(msgs, GREEDY, tools=TOOLS)
    assert with_tools.text == PYTHON_TAG * 8
    assert tagging.generate(msgs, GREEDY).text == ""  # a control token: not text without tools
    assert tagging.count_prompt_tokens(msgs, TOOLS) > tagging.count_prompt_tokens(msgs) + 50


def test_eom_ends_the_reply_as_a_tool_call(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "eom.gguf", dominant_token=128008)
    with load_engine(path, plan=cpu_plan()) as eng:
        result = eng.generate([Message("user", "hi")], GREEDY, tools=TOOLS)
    assert result.text == "" and result.stats.stop_reason == "tool_call"
    assert result.stats.completion_tokens == 0


# -- corral ask --tools ---------------------------------------------------------------------------------


class _Replies:
    """A loaded engine whose generate() returns canned text (the tiny model cannot write calls)."""

    def __init__(self, engine: LlamaEngine, text: str) -> None:
        self._engine, self.text = engine, text
        self.tools: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, messages: Any, settings: Any, *, on_text: Any = None, cancel: Any = None,
                 tools: Any = None) -> Any:
        from dataclasses import replace

        self.tools = tools
        result = self._engine.generate(messages, replace(settings, max_tokens=1), tools=tools)
        return replace(result, text=self.text)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("as_json", [False, True])
def test_ask_with_tools_prints_calls_as_json(tagging: LlamaEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             as_json: bool) -> None:
    proxy = _Replies(tagging, PYTHON_TAG + '{"name": "get_weather", "parameters": {"city": "Paris"}}')
    monkeypatch.setattr(engine_mod, "load_engine", lambda *a, **k: proxy)
    monkeypatch.setattr(engine_mod, "make_plan", lambda *a, **k: cpu_plan())
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([WEATHER]))
    args = ["ask", "-m", str(tagging.path), "--tools", str(tools_file), "Weather in Paris?"] + (["--json"] * as_json)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert proxy.tools is not None and proxy.tools.function_names() == ["get_weather"]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    calls = lines[0]["tool_calls"] if as_json else [lines[0]]
    assert calls == [{"id": "call_0", "name": "get_weather", "arguments": {"city": "Paris"}, "kind": "function"}]
    assert "runs none of them" in result.stderr


def test_ask_reports_a_broken_call_and_runs_nothing(tagging: LlamaEngine, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = _Replies(tagging, '{"name": "get_weather", "parameters": {"ci')
    monkeypatch.setattr(engine_mod, "load_engine", lambda *a, **k: proxy)
    monkeypatch.setattr(engine_mod, "make_plan", lambda *a, **k: cpu_plan())
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps({"tools": [WEATHER]}))
    result = CliRunner().invoke(cli, ["ask", "-m", str(tagging.path), "--tools", str(tools_file), "--json", "x"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["tool_calls"] == [] and "cut short" in doc["invalid_tool_calls"][0]["error"]
    assert "could not read" in result.stderr


def test_ask_with_a_bad_tools_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "tools.json"
    bad.write_text('[{"type": "function", "function": {"name": "a b"}}]')
    result = CliRunner().invoke(cli, ["ask", "-m", str(tmp_path / "none.gguf"), "--tools", str(bad), "hi"])
    assert result.exit_code == 2 and "name must be" in result.stderr
