"""Pilot tests of tool calls in the chat: shown literally, never run, the next message is the tool's result."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from corral.app.chats.store import ChatStore
from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.tools import ToolSet, parse_reply, tool_set
from corral.tui.app import ChatApp, make_app
from corral.tui.prompt_input import PromptInput
from corral.tui.tool_turns import TOOL_DISMISSED, TOOL_PENDING
from tests.helpers.fake_engine import FakeEngine, replied, run_chat, store_fixture  # noqa: F401 (fixture)
from tests.helpers.tools import TIME, WEATHER

TOOLS = tool_set([WEATHER, TIME])
CALL = json.dumps({"name": "get_weather", "parameters": {"city": "[b]Paris[/b]"}})


def build(engine: FakeEngine, store: ChatStore, tmp_path: Path, tools: ToolSet | None) -> ChatApp:
    return make_app(lambda progress, cancel: engine, store, SamplingSettings(), show_list_at_start=False,
                    export_dir=tmp_path, tools=tools)


async def send(pilot, text: str) -> None:  # type: ignore[no-untyped-def]
    pilot.app.screen.query_one(PromptInput).load_text(text)
    await pilot.press("enter")


def shown_calls(box) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(w.render()) for w in box.query(".tool-calls")]


def rows(store: ChatStore) -> list[tuple[str, str]]:
    db = sqlite3.connect(store.path)
    try:
        return db.execute("SELECT role, content FROM messages ORDER BY id").fetchall()
    finally:
        db.close()


def test_a_tool_call_is_shown_not_run_and_the_next_message_is_its_result(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine([CALL, "It is 21 °C in Paris."])
    app = build(engine, store, tmp_path, TOOLS)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "weather in Paris?")
        await replied(pilot, chat, 2)
        reply = chat.view.boxes()[1]
        # literal: the markup-like text in the arguments is shown as typed, not styled
        assert shown_calls(reply) == ['tool call (not run): get_weather {"city": "[b]Paris[/b]"}']
        assert chat.tool_pending
        assert chat.prompt.placeholder == TOOL_PENDING
        assert ("warning", TOOL_PENDING) in app.notices
        await pilot.pause(0.2)
        assert len(engine.calls) == 1  # nothing ran and nothing was generated on the model's behalf
        assert engine.calls[0].tools == TOOLS

        await send(pilot, '{"temp_c": 21}')
        await replied(pilot, chat, 4)
        assert [b.role for b in chat.view.boxes()] == ["user", "assistant", "ipython", "assistant"]
        assert not chat.tool_pending and chat.prompt.placeholder == ""
        assert shown_calls(chat.view.boxes()[3]) == []

    run_chat(app, scenario, size=(100, 30))
    call = parse_reply(CALL, TOOLS).calls
    assert engine.calls[1].messages == [
        Message("user", "weather in Paris?"),
        Message("assistant", "", tool_calls=call),
        Message("ipython", '{"temp_c": 21}'),
    ]
    assert rows(store) == [("user", "weather in Paris?"), ("assistant", CALL),
                           ("user", '[tool result]\n{"temp_c": 21}'), ("assistant", "It is 21 °C in Paris.")]


def test_escape_after_a_call_sends_a_normal_message_and_bad_calls_are_named(store: ChatStore, tmp_path: Path) -> None:
    bad = json.dumps({"name": "rm_rf", "parameters": {}})
    engine = FakeEngine([bad, "Sorry."])
    app = build(engine, store, tmp_path, TOOLS)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "clean up")
        await replied(pilot, chat, 2)
        [note] = shown_calls(chat.view.boxes()[1])
        assert note.startswith("invalid call: ") and "rm_rf" in note
        assert chat.tool_pending
        await pilot.press("escape")
        assert not chat.tool_pending
        assert ("information", TOOL_DISMISSED) in app.notices
        await send(pilot, "never mind")
        await replied(pilot, chat, 4)
        assert chat.view.boxes()[2].role == "user"

    run_chat(app, scenario, size=(100, 30))
    assert engine.calls[1].messages[-1] == Message("user", "never mind")


def test_without_tools_a_json_reply_is_just_text(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine([CALL])
    app = build(engine, store, tmp_path, None)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "weather in Paris?")
        await replied(pilot, chat, 2)
        assert shown_calls(chat.view.boxes()[1]) == []
        assert not chat.tool_pending

    run_chat(app, scenario, size=(100, 30))
    assert engine.calls[0].tools is None
