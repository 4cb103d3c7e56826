"""The chat TUI shows untrusted text (model name, prompt, reply, paths, errors, plan) literally, and keeps
every key typed while the model loads."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from textual import events
from textual.geometry import Region
from textual.widget import Widget

from corral.app.chats.store import ChatStore
from corral.app.runtime.api import SamplingSettings
from corral.convert.errors import EngineError
from corral.offload.plan import DevicePlan
from corral.tui.app import ChatApp, make_app
from corral.tui.chat_screen import ChatScreen
from corral.tui.conversation_list import ConversationListScreen
from corral.tui.load_screen import EARLY_ENTER_HINT, LoadScreen
from corral.tui.memory_view import LiveUsage, MemoryScreen
from corral.tui.message_view import MessageBox
from corral.tui.prompt_input import PromptInput
from tests.faults.corpus_markup import EVIL, STYLED, UNMATCHED
from tests.helpers.fake_engine import (  # noqa: F401 (fixture)
    FakeEngine,
    chat_ready,
    replied,
    run_chat,
    store_fixture,
    wait_until,
)
from tests.helpers.plans import make_plan

WIDE = (220, 50)
# What a Markdown reply may hold and still read the same: no backslash escapes (Markdown's own syntax).
REPLY = f"{UNMATCHED} {STYLED} :smile: [reverse]"


def shown(widget: Widget) -> str:
    """The text `widget` and its descendants draw on screen, whitespace runs collapsed to one space."""
    lines: list[str] = []
    for w in (widget, *widget.query("*")):
        width, height = w.outer_size
        if width and height:
            lines += [strip.text for strip in w.render_lines(Region(0, 0, width, height))]
    return " ".join(" ".join(lines).split())


def toasts(app: ChatApp) -> str:
    """The text of the toasts on screen (a toast shows at most a few lines: keep messages short)."""
    return " ".join(" ".join(shown(t).replace("▌", " ").split()) for t in app.screen.query("Toast"))


def build(engine: FakeEngine, store: ChatStore, tmp_path: Path, **options: object) -> ChatApp:
    options.setdefault("show_list_at_start", False)
    options.setdefault("export_dir", tmp_path / "exports")
    return make_app(lambda progress, cancel: engine, store, SamplingSettings(), **options)


# -------------------------------------------------------------------------- markup is data


def test_prompt_reply_model_name_and_title_are_literal(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine([REPLY], model_name=EVIL)
    app = build(engine, store, tmp_path)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        chat.prompt.load_text(EVIL)
        await pilot.press("enter")
        await replied(pilot, chat, 2)
        user, reply = chat.view.boxes()
        assert reply.content == REPLY
        assert EVIL in shown(user)
        assert REPLY in shown(reply)
        assert shown(chat.status).startswith(EVIL + " │ ctx ")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationListScreen), what="the list")
        await pilot.pause()
        listed = shown(app.screen)
        assert store.list_conversations()[0].title in listed and UNMATCHED in listed
        assert EVIL in listed  # the model name, on the row's second line

    run_chat(app, scenario, size=WIDE)


def test_notifications_are_literal(store: ChatStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine error and an export path, both holding markup, reach the toasts as they are."""
    monkeypatch.chdir(tmp_path)
    engine = FakeEngine(["fine"])
    export_dir = Path("[", "x] [bold]out")  # relative: the toast shows the whole path
    app = build(engine, store, tmp_path, export_dir=export_dir)
    error = "[/] evil [bold red]x :smile:"

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        engine.fail = EngineError(error)
        chat.prompt.load_text("hello")
        await pilot.press("enter")
        await wait_until(pilot, lambda: error in toasts(app), timeout=10, what="the error toast")
        assert ("error", error) in app.notices
        export_dir.mkdir(parents=True)
        await pilot.press("ctrl+s")
        (written,) = export_dir.iterdir()
        await wait_until(pilot, lambda: f"exported to {written}" in toasts(app), timeout=10, what="the export toast")

    run_chat(app, scenario, size=WIDE, notifications=True)


def test_memory_view_shows_plan_text_literally(store: ChatStore, tmp_path: Path) -> None:
    gib = 1024**3
    plan = make_plan(devices=[DevicePlan("[/]GPU0", "gpu", "[bold]RTX", 20 * gib, gib, gib, gib, 24 * gib, 1e12),
                              DevicePlan("CPU", "cpu", "CPU", 9 * gib, 0, gib, 0, 64 * gib, 8e10)],
                     headline=EVIL, warnings=[STYLED])
    engine = FakeEngine(plan=plan)
    app = build(engine, store, tmp_path, memory_probe=lambda: LiveUsage(rss_bytes=gib), memory_interval=0)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, MemoryScreen), what="the memory view")
        await pilot.pause()
        text = shown(app.screen)
        assert EVIL in text and "[/]GPU0" in text and f"⚠ {STYLED}" in text

    run_chat(app, scenario, size=WIDE)


def test_load_screen_shows_label_and_detail_literally(store: ChatStore, tmp_path: Path) -> None:
    def factory(progress, cancel):  # type: ignore[no-untyped-def]
        cancel.wait(60)
        raise EngineError("cancelled")

    app = make_app(factory, store, SamplingSettings(), model_label=EVIL, load_detail=STYLED, show_list_at_start=False)

    async def scenario() -> None:
        async with app.run_test(size=WIDE) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, LoadScreen) and app.screen.is_mounted,
                             what="the load screen")
            await pilot.pause()
            text = shown(app.screen)
            assert f"Loading {EVIL}" in text and STYLED in text
            await pilot.press("escape")

    asyncio.run(scenario())


# ------------------------------------------------------------------- typing during the load


class HeldLoad:
    """An engine factory whose load blocks until the test calls `release()` (or the app cancels it)."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.started = threading.Event()
        self._go = threading.Event()

    def __call__(self, progress, cancel: threading.Event) -> FakeEngine:  # type: ignore[no-untyped-def]
        progress(0.3)
        self.started.set()
        while not (self._go.wait(0.01) or cancel.is_set()):
            pass
        return self.engine

    def release(self) -> None:
        self._go.set()


async def loading(pilot) -> LoadScreen:  # type: ignore[no-untyped-def]
    """Wait for the load screen to be up with its load under way."""
    app = pilot.app
    factory = app.engine_factory
    await wait_until(pilot, lambda: factory.started.is_set() and isinstance(app.screen, LoadScreen)
                     and app.screen.is_mounted, what="the load screen")
    await pilot.pause()
    return app.screen


def prompt_text(app: ChatApp) -> str:
    return app.screen.query_one(PromptInput).text


def test_text_typed_during_load_lands_in_the_prompt(store: ChatStore, tmp_path: Path) -> None:
    """Typing, a newline, cursor moves and Enter while loading: the chat's prompt box holds exactly that text,
    its cursor where it was, and nothing was sent; the conversation list is skipped (the user is chatting)."""
    store.add_message(store.new_conversation(model="m"), "user", "an older chat")
    engine = FakeEngine(["the answer"])
    held = HeldLoad(engine)
    app = make_app(held, store, SamplingSettings(), show_list_at_start=True, export_dir=tmp_path)

    async def scenario() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            load = await loading(pilot)
            await pilot.press(*"what is", "ctrl+j", *"a lama", "left", "left", "left", "l")
            assert load.query_one(PromptInput).text == "what is\na llama"
            await pilot.press("enter")  # too early: kept, not lost
            assert isinstance(app.screen, LoadScreen) and prompt_text(app) == "what is\na llama"
            assert EARLY_ENTER_HINT in shown(load.query_one("#load-hint"))
            held.release()
            chat = await chat_ready(pilot)
            assert isinstance(app.screen, ChatScreen)  # no conversation list on top
            assert not any(isinstance(s, ConversationListScreen) for s in app.screen_stack)
            assert chat.prompt.text == "what is\na llama"
            assert chat.prompt.has_focus
            await pilot.press("m")  # the cursor came along: right after the "l" typed last
            assert chat.prompt.text == "what is\na llmama"
            assert engine.calls == [] and not chat.view.boxes()
            await pilot.press("backspace", "enter")
            await replied(pilot, chat, 2)
            assert [b.content for b in chat.query(MessageBox)] == ["what is\na llama", "the answer"]

    asyncio.run(scenario())


def key(app: ChatApp, char: str) -> None:
    """Queue a key press on the app right now, as the terminal driver does (no waiting for it)."""
    event = events.Key(char, char)
    event.set_sender(app)
    app.post_message(event)


@pytest.mark.parametrize("after", [1, 16])
def test_keys_racing_the_screen_switch_are_kept(after: int, store: ChatStore, tmp_path: Path) -> None:
    """Keys queued just before the load's end and just after it (ahead of the chat screen's mount) all
    reach the prompt box, in order. The order in the app's queue is forced: keys, load done, keys."""
    held = HeldLoad(FakeEngine())
    app = make_app(held, store, SamplingSettings(), show_list_at_start=False, export_dir=tmp_path)
    typed = "abcd"
    racing = "".join(chr(ord("e") + i % 20) for i in range(after))

    async def scenario() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            await loading(pilot)
            await pilot.press(*typed[:2])  # handled by the load screen's box
            held.release()
            assert app.load_done.wait(30)  # the event loop is held here: "loaded" is not in the queue yet
            for char in typed[2:]:
                key(app, char)  # queued before "loaded"
            await asyncio.sleep(0)  # lets the worker's "loaded" into the app's queue (and maybe handled)
            for char in racing:
                key(app, char)  # queued after "loaded", before the chat screen exists
            chat = await chat_ready(pilot)
            await wait_until(pilot, lambda: len(chat.prompt.text) >= len(typed + racing), timeout=10,
                             what="every key in the prompt box")
            assert chat.prompt.text == typed + racing

    asyncio.run(scenario())


def test_escape_still_cancels_the_load_while_typing(store: ChatStore, tmp_path: Path) -> None:
    from corral.convert.errors import Cancelled

    def factory(progress, cancel):  # type: ignore[no-untyped-def]
        if not cancel.wait(60):
            raise AssertionError("never cancelled")
        raise Cancelled("model loading cancelled")

    app = make_app(factory, store, SamplingSettings(), show_list_at_start=False)

    async def scenario() -> None:
        async with app.run_test() as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, LoadScreen) and app.screen.is_mounted,
                             what="the load screen")
            await pilot.press(*"typing")
            assert app.screen.query_one(PromptInput).has_focus
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.failure is not None, what="cancel")

    asyncio.run(scenario())
    assert isinstance(app.failure, Cancelled)
    assert app.return_code == 130
