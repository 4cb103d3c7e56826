"""Pilot tests of the chat app with a FakeEngine: streaming, stop, input, persistence, overflow."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from corral.app.chats.store import ChatStore
from corral.app.runtime.api import Message, SamplingSettings
from corral.tui.app import ChatApp, make_app
from corral.tui.prompt_input import PromptInput
from tests.helpers.fake_engine import FakeEngine, replied, run_chat, split_tokens, store_fixture, wait_until  # noqa: F401 (fixture)

LONG_REPLY = " ".join(f"word{i}" for i in range(400))


def build(engine: FakeEngine, store: ChatStore, tmp_path: Path, settings: SamplingSettings | None = None,
          **options: object) -> ChatApp:
    options.setdefault("show_list_at_start", False)
    options.setdefault("export_dir", tmp_path / "exports")
    return make_app(lambda progress, cancel: engine, store, settings or SamplingSettings(), **options)


def db_rows(store: ChatStore) -> list[tuple[str, str, str]]:
    """What another process would read right now."""
    db = sqlite3.connect(store.path)
    try:
        return db.execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()
    finally:
        db.close()


async def send(pilot, text: str) -> None:  # type: ignore[no-untyped-def]
    prompt = pilot.app.screen.query_one(PromptInput)
    prompt.load_text(text)
    await pilot.press("enter")


def test_reply_streams_renders_and_is_saved(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine(["Here is **code**:\n\n```python\nprint('hi')\n```\n"])
    app = build(engine, store, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "show me code")
        await replied(pilot, chat, 2)
        user, reply = chat.view.boxes()
        assert (user.role, user.content) == ("user", "show me code")
        assert reply.content == "Here is **code**:\n\n```python\nprint('hi')\n```\n"
        assert reply.status == "stop"
        fences = [w for w in reply.query("MarkdownFence")]
        assert len(fences) == 1  # rendered as Markdown with a code block
        line = chat.status.line()
        assert line.startswith("fake-model.gguf │ ctx ")
        stats_prompt = engine.count_prompt_tokens([Message("user", "show me code")])
        n_reply = len(split_tokens(reply.content))
        assert f"ctx {stats_prompt + n_reply}/4,096" in line
        assert "prompt 200.0 tok/s" in line and "gen 50.0 tok/s" in line
        assert prompt_text(pilot) == ""

    run_chat(app, scenario, size=(100, 30))
    assert db_rows(store) == [
        ("user", "show me code", "done"),
        ("assistant", "Here is **code**:\n\n```python\nprint('hi')\n```\n", "stop"),
    ]
    assert engine.calls[0].messages == [Message("user", "show me code")]


def prompt_text(pilot) -> str:  # type: ignore[no-untyped-def]
    return pilot.app.screen.query_one(PromptInput).text


def test_user_turn_saved_before_generation_and_reply_saved_while_streaming(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine([LONG_REPLY], hold_after=10)
    app = build(engine, store, tmp_path, save_interval=0.1)
    seen_at_start: list[list[tuple[str, str, str]]] = []
    original = engine.generate

    def generate(messages, settings, *, on_text=None, cancel=None):  # type: ignore[no-untyped-def]
        seen_at_start.append(db_rows(store))
        return original(messages, settings, on_text=on_text, cancel=cancel)

    engine.generate = generate  # type: ignore[method-assign]

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "a long story please")
        await wait_until(pilot, lambda: any(r[0] == "assistant" and len(r[1]) > 20 for r in db_rows(store)),
                         what="a partial reply in the database")
        partial = [r for r in db_rows(store) if r[0] == "assistant"][0]
        assert partial[2] == "streaming" and LONG_REPLY.startswith(partial[1])
        assert chat.job is not None  # still generating while the partial is on disk
        await pilot.press("escape")

    run_chat(app, scenario)
    assert seen_at_start == [[("user", "a long story please", "done")]]


def test_escape_stops_at_once_keeps_partial_and_second_escape_is_harmless(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine([LONG_REPLY, "next reply"], hold_after=10)
    app = build(engine, store, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "go")
        await wait_until(pilot, lambda: len(chat.view.boxes()) == 2 and len(chat.view.boxes()[1].content) > 30,
                         what="some streamed text")
        job = chat.job
        assert job is not None
        await pilot.press("escape")
        # stopped at once: the UI is idle again before the engine notices the flag
        assert chat.job is None and job.cancel.is_set()
        reply = chat.view.boxes()[1]
        shown = reply.content
        assert reply.status == "cancelled" and LONG_REPLY.startswith(shown) and shown != LONG_REPLY
        assert "stopped" in chat.status.line()
        await pilot.press("escape")  # second escape: nothing happens
        await wait_until(pilot, job.done.is_set, what="the worker to end")
        await pilot.pause(0.1)
        assert chat.view.boxes()[1].content == shown
        assert db_rows(store)[-1] == ("assistant", shown, "cancelled")
        # the conversation goes on (FakeEngine raises if called while still busy)
        await send(pilot, "continue")
        await replied(pilot, chat, 4, what="second reply")
        assert chat.view.boxes()[3].content == "next reply"
        assert engine.calls[1].messages[-2:] == [Message("assistant", shown), Message("user", "continue")]

    run_chat(app, scenario)
    assert not [n for n in app.notices if n[0] == "error"]


def test_enter_refused_while_streaming(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine([LONG_REPLY], hold_after=5)
    app = build(engine, store, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "first")
        await wait_until(pilot, engine.holding.is_set, what="the stream to reach its hold")
        await send(pilot, "second")
        assert prompt_text(pilot) == "second"  # kept, not sent
        assert ("warning", "a reply is still streaming; escape stops it") in app.notices
        await pilot.press("escape")
        assert [b.role for b in chat.view.boxes()] == ["user", "assistant"]

    run_chat(app, scenario)


def test_multiline_input_and_history(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine()
    app = build(engine, store, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("a", "ctrl+j", "b", "enter")
        await replied(pilot, chat, 2, what="reply 1")
        assert chat.view.boxes()[0].content == "a\nb"
        await pilot.press(*"second", "enter")
        await replied(pilot, chat, 4, what="reply 2")
        await pilot.press(*"draft")
        await pilot.press("up")
        assert prompt_text(pilot) == "second"
        await pilot.press("up")
        assert prompt_text(pilot) == "a\nb"
        await pilot.press("up")  # oldest: stays
        assert prompt_text(pilot) == "a\nb"
        await pilot.press("down")
        assert prompt_text(pilot) == "second"
        await pilot.press("down")
        assert prompt_text(pilot) == "draft"  # back to what was being typed

    run_chat(app, scenario)
    assert engine.calls[0].messages == [Message("user", "a\nb")]


def test_regenerate_replaces_last_reply(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine(["first answer", "second answer"])
    app = build(engine, store, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "question")
        await replied(pilot, chat, 2)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: chat.job is None and chat.view.boxes()[-1].content == "second answer",
                         what="regenerated reply")
        assert [b.content for b in chat.view.boxes()] == ["question", "second answer"]

    run_chat(app, scenario)
    assert engine.calls[1].messages == engine.calls[0].messages == [Message("user", "question")]
    assert [r[:2] for r in db_rows(store)] == [("user", "question"), ("assistant", "second answer")]


def test_settings_change_system_prompt_and_sampling(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine()
    app = build(engine, store, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f2")
        screen = app.screen
        assert type(screen).__name__ == "SettingsScreen"
        screen.query_one("#system-prompt").load_text("Be terse.")
        screen.query_one("#temperature").value = "9"
        await pilot.press("ctrl+s")
        assert app.screen is screen  # refused
        assert ("error", "temperature must be between 0 and 5") in app.notices
        screen.query_one("#temperature").value = "0.2"
        screen.query_one("#top-p").value = "0.5"
        screen.query_one("#max-tokens").value = "64"
        screen.query_one("#seed").value = "7"
        await pilot.press("ctrl+s")
        assert app.screen is chat
        await send(pilot, "hi")
        await replied(pilot, chat, 2)

    run_chat(app, scenario, size=(100, 40))
    call = engine.calls[0]
    assert call.settings == SamplingSettings(temperature=0.2, top_p=0.5, max_tokens=64, seed=7)
    assert call.messages == [Message("system", "Be terse."), Message("user", "hi")]
    (summary,) = store.list_conversations()
    assert store.get(summary.id).system_prompt == "Be terse."


def test_context_overflow_keeps_conversation_and_typed_text(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine(["short answer"], n_ctx=40)
    app = build(engine, store, tmp_path)
    too_long = " ".join(["many words"] * 20)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "hello")
        await replied(pilot, chat, 2)
        await send(pilot, too_long)
        await wait_until(pilot, lambda: any(s == "error" for s, _ in app.notices), what="an error")
        await pilot.pause(0.05)
        assert [b.content for b in chat.view.boxes()] == ["hello", "short answer"]
        assert prompt_text(pilot) == too_long  # nothing typed is lost
        assert chat.job is None and chat.status.state == ""

    run_chat(app, scenario)
    (error,) = [m for s, m in app.notices if s == "error"]
    assert error.startswith("context full: ") and "ctrl+n" in error
    assert [r[:2] for r in db_rows(store)] == [("user", "hello"), ("assistant", "short answer")]


def test_engine_error_is_notified_and_partial_kept(store: ChatStore, tmp_path: Path) -> None:
    from corral.convert.errors import EngineError

    engine = FakeEngine()
    engine.fail = EngineError("llama_decode failed: out of memory")
    app = build(engine, store, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "hi")
        await replied(pilot, chat, 2, what="failure")
        assert chat.view.boxes()[1].status == "error"

    run_chat(app, scenario)
    assert ("error", "llama_decode failed: out of memory") in app.notices


def test_store_locked_when_sending_keeps_text(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine()
    locked = ChatStore(store.path, timeout=0.1)
    app = build(engine, locked, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        holder = sqlite3.connect(store.path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            await send(pilot, "important words")
            await wait_until(pilot, lambda: any(s == "error" for s, _ in app.notices), what="the locked-store error")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert prompt_text(pilot) == "important words"
        assert engine.calls == []

    run_chat(app, scenario)
    locked.close()
    errors = [m for s, m in app.notices if s == "error"]
    assert len(errors) == 1 and "locked" in errors[0] and str(store.path) in errors[0]


def test_ctrl_q_during_reply_saves_partial_and_quits(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine([LONG_REPLY], hold_after=5)
    app = build(engine, store, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "go")
        await wait_until(pilot, lambda: len(chat.view.boxes()) == 2 and chat.view.boxes()[1].content,
                         what="streaming")
        assert engine.holding.is_set()  # still streaming when ctrl+q comes
        await pilot.press("ctrl+q")
        await pilot.pause(0.05)

    run_chat(app, scenario)
    app.shutdown(timeout=10)
    assert engine.closed
    rows = db_rows(store)
    assert rows[-1][0] == "assistant" and rows[-1][2] == "cancelled" and LONG_REPLY.startswith(rows[-1][1])
    assert rows[-1][1]


def test_reply_box_renders_at_bounded_rate(store: ChatStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,500 pieces become few Markdown appends to the live reply; earlier messages are never touched."""
    from textual.widgets import Markdown

    engine = FakeEngine(["first reply", " ".join(["tok"] * 1500)], token_delay=0.0005)
    app = build(engine, store, tmp_path, SamplingSettings(max_tokens=0), flush_interval=0.05)
    appends: list[tuple[int, int]] = []
    original = Markdown.append

    def counting(self, text: str):  # type: ignore[no-untyped-def]
        appends.append((id(self), len(text)))
        return original(self, text)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await send(pilot, "first")
        await replied(pilot, chat, 2, what="reply 1")
        first_markdown = chat.view.boxes()[1].query_one(Markdown)
        monkeypatch.setattr(Markdown, "append", counting)
        await send(pilot, "second")
        await replied(pilot, chat, 4, what="reply 2", timeout=20)
        live = chat.view.boxes()[3].query_one(Markdown)
        assert live.source.split() == ["tok"] * 1500
        assert first_markdown.source == "first reply"
        assert {widget for widget, _ in appends} == {id(live)}

    run_chat(app, scenario)
    assert 1 <= len(appends) < 300  # batched per frame, not per token
    assert sum(n for _, n in appends) == len(" ".join(["tok"] * 1500))
