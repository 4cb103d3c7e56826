"""Pilot tests of the conversation list, export, memory view and help screen."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from corral.app.chats.store import ChatStore
from corral.app.runtime.api import Message, SamplingSettings
from corral.tui.app import ChatApp, make_app
from corral.tui.chat_screen import ChatScreen
from corral.tui.conversation_list import ConversationListScreen
from corral.tui.help_screen import HelpScreen, listed_keys
from corral.tui.load_screen import LoadScreen
from corral.tui.memory_view import GpuUsage, LiveUsage, MemoryScreen, probe_live_usage, render_memory
from corral.tui.prompt_input import PromptInput
from corral.tui.settings_screen import SettingsScreen, parse_sampling
from tests.helpers.fake_engine import FakeEngine, fake_plan, replied, run_chat, store_fixture, wait_until  # noqa: F401 (fixture)

GIB = 1024**3


def seed(store: ChatStore) -> tuple[int, int]:
    a = store.new_conversation(model="m.gguf")
    store.add_message(a, "user", "alpha question")
    store.update_reply(store.start_reply(a), "alpha answer", status="stop")
    b = store.new_conversation(model="m.gguf", system_prompt="Talk like a pirate.")
    store.add_message(b, "user", "beta question")
    store.start_reply(b, "beta half an ans")  # never finished: the process died while it streamed
    return a, b


def build(engine: FakeEngine, store: ChatStore, tmp_path: Path, **options: object) -> ChatApp:
    options.setdefault("export_dir", tmp_path / "exports")
    return make_app(lambda progress, cancel: engine, store, SamplingSettings(), **options)


def test_list_at_start_resume_and_continue(store: ChatStore, tmp_path: Path) -> None:
    a, b = seed(store)
    engine = FakeEngine(["fresh beta answer"])
    app = build(engine, store, tmp_path, show_list_at_start=True)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationListScreen), what="list")
        # newest first: "+ New", beta, alpha
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: app.screen is chat and chat.conversation_id == b, what="resume")
        boxes = chat.view.boxes()
        assert [(x.role, x.content, x.status) for x in boxes] == [
            ("user", "beta question", "done"),
            ("assistant", "beta half an ans", "streaming"),
        ]
        assert boxes[1].query_one(".note").render().plain == "(interrupted)"
        await pilot.press("ctrl+r")  # regenerate the interrupted reply
        await wait_until(pilot, lambda: chat.job is None and chat.view.boxes()[-1].content == "fresh beta answer",
                         what="regenerated")

    run_chat(app, scenario)
    assert engine.calls[0].messages == [Message("system", "Talk like a pirate."), Message("user", "beta question")]
    assert [(m.role, m.content) for m in store.get(b).messages] == [("user", "beta question"),
                                                                     ("assistant", "fresh beta answer")]
    assert len(store.get(a).messages) == 2


def test_resume_by_id_skips_list(store: ChatStore, tmp_path: Path) -> None:
    a, _ = seed(store)
    app = build(FakeEngine(), store, tmp_path, conversation_id=a)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await pilot.pause(0.1)
        assert isinstance(app.screen, ChatScreen)
        assert [x.content for x in chat.view.boxes()] == ["alpha question", "alpha answer"]
        await wait_until(pilot, lambda: chat.status.ctx_used > 0, what="context count")
        expected = FakeEngine().count_prompt_tokens([Message("user", "alpha question"),
                                                     Message("assistant", "alpha answer")])
        assert chat.status.ctx_used == expected

    run_chat(app, scenario)


def test_list_delete_twice_export_and_new(store: ChatStore, tmp_path: Path) -> None:
    a, b = seed(store)
    app = build(FakeEngine(), store, tmp_path, conversation_id=b)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationListScreen), what="list")
        screen = app.screen
        assert screen._highlighted_id() == b  # the current conversation is highlighted
        await pilot.press("e")
        exported = tmp_path / "exports" / f"corral-chat-{b}-beta-question.md"
        assert exported.read_text(encoding="utf-8").startswith("# beta question\n")
        await pilot.press("d")
        assert len(store.list_conversations()) == 2  # armed, not deleted
        await pilot.press("d")
        assert [s.id for s in store.list_conversations()] == [a]
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is chat, what="back")
        # the open conversation was deleted: the chat starts fresh
        assert chat.conversation_id is None and chat.view.boxes() == []
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationListScreen), what="list again")
        await pilot.press("n")
        await wait_until(pilot, lambda: app.screen is chat, what="new")
        assert chat.conversation_id is None

    run_chat(app, scenario)


def test_ctrl_s_exports_current_and_ctrl_n_starts_new(store: ChatStore, tmp_path: Path) -> None:
    engine = FakeEngine(["an answer"])
    app = build(engine, store, tmp_path, show_list_at_start=False)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("ctrl+s")
        assert ("warning", "nothing to export yet") in app.notices
        chat.query_one(PromptInput).load_text("Hello there")
        await pilot.press("enter")
        await replied(pilot, chat, 2)
        cid = chat.conversation_id
        await pilot.press("ctrl+s")
        path = tmp_path / "exports" / f"corral-chat-{cid}-hello-there.md"
        assert path.read_text(encoding="utf-8").endswith("## User\n\nHello there\n\n## Assistant\n\nan answer\n")
        assert ("information", f"exported to {path}") in app.notices
        await pilot.press("ctrl+n")
        assert chat.conversation_id is None and chat.view.boxes() == []
        assert chat.query_one("#placeholder").display

    run_chat(app, scenario)


def test_memory_view_plan_and_live_usage(store: ChatStore, tmp_path: Path) -> None:
    readings = iter(range(1, 100))

    def probe() -> LiveUsage:
        return LiveUsage(next(readings) * GIB, (GpuUsage(0, "RTX 4090", 22 * GIB, 24 * GIB, None),), nvml=True)

    app = build(FakeEngine(plan=fake_plan(disk=True)), store, tmp_path, show_list_at_start=False,
                memory_probe=probe, memory_interval=0.05)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, MemoryScreen), what="memory view")
        first = app.screen.query_one("#memory-table").render()
        await pilot.pause(0.3)
        later = app.screen.query_one("#memory-table").render()
        assert str(first) != str(later)  # live values refresh
        await pilot.press("escape")
        assert isinstance(app.screen, ChatScreen)

    run_chat(app, scenario, size=(110, 40))


def test_render_memory_text() -> None:
    from rich.console import Console

    console = Console(width=140, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    live = LiveUsage(5 * GIB, (GpuUsage(0, "RTX 4090", 22 * GIB, 24 * GIB, 21 * GIB),
                               GpuUsage(1, "RTX 3060", GIB, 12 * GIB, None)), nvml=True)
    console.print(render_memory(fake_plan(disk=True), live))
    text = console.export_text()
    assert "GPU0" in text and "20.0 GiB" in text and "22.0 GiB VRAM used; ours 21.0 GiB" in text
    assert "5.0 GiB RSS" in text
    assert "GPU1 (not in plan)" in text
    assert "weights stream from disk on every token" in text
    console.print(render_memory(fake_plan(disk=False), LiveUsage(GIB)))
    text2 = console.export_text()
    assert "stream from disk" not in text2 and "NVML not available" in text2
    console.print(render_memory(None, LiveUsage(GIB)))
    assert "No offload plan" in console.export_text()


def test_probe_live_usage_reads_this_process() -> None:
    import psutil

    usage = probe_live_usage()
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < usage.rss_bytes < 2 * rss
    assert all(g.total_bytes >= g.used_bytes for g in usage.gpus)


def test_help_lists_every_key_of_every_screen(store: ChatStore, tmp_path: Path) -> None:
    listed = listed_keys()
    screens = [ChatScreen, ConversationListScreen, SettingsScreen, MemoryScreen, LoadScreen, HelpScreen]
    for screen in screens:
        for binding in screen.BINDINGS:
            for key in binding.key.split(","):
                name = {"question_mark": "?"}.get(key, key)
                assert name in listed, f"{screen.__name__}: {key} missing from help"
    assert "ctrl+q" in listed
    app = build(FakeEngine(), store, tmp_path, show_list_at_start=False)

    async def scenario(pilot, chat) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert app.screen is chat
        await pilot.press("?")  # typed into the focused prompt, not a shortcut there
        assert chat.query_one(PromptInput).text == "?"
        chat.set_focus(None)
        await pilot.press("?")
        assert isinstance(app.screen, HelpScreen)

    run_chat(app, scenario)


def test_parse_sampling_bounds() -> None:
    assert parse_sampling("0", "1", "0", "") == SamplingSettings(0.0, 1.0, 0, None)
    for bad, message in ((("x", "1", "1", ""), "temperature"), (("0.5", "0", "1", ""), "top-p"),
                         (("0.5", "1", "-1", ""), "max tokens"), (("0.5", "1", "1", "abc"), "seed")):
        with pytest.raises(ValueError, match=message):
            parse_sampling(*bad)


def test_load_progress_and_cancel(store: ChatStore, tmp_path: Path) -> None:
    from corral.convert.errors import Cancelled

    reached = threading.Event()

    def factory(progress, cancel):  # type: ignore[no-untyped-def]
        progress(0.25)
        progress(0.5)
        reached.set()
        if not cancel.wait(10):
            raise AssertionError("never cancelled")
        raise Cancelled("model loading cancelled")

    app = make_app(factory, store, SamplingSettings(), show_list_at_start=False)

    async def scenario() -> None:
        async with app.run_test() as pilot:
            await wait_until(pilot, reached.is_set, what="factory")
            await pilot.pause(0.1)
            screen = app.screen
            assert isinstance(screen, LoadScreen)
            assert screen.query_one("ProgressBar").progress == 50
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.failure is not None, what="cancel")

    asyncio.run(scenario())
    assert isinstance(app.failure, Cancelled)
    assert app.return_code == 130


def test_load_failure_exits_with_the_error(store: ChatStore, tmp_path: Path) -> None:
    from corral.convert.errors import InvalidGGUF

    def factory(progress, cancel):  # type: ignore[no-untyped-def]
        raise InvalidGGUF("bad magic", path="/models/x.gguf")

    app = make_app(factory, store, SamplingSettings(), show_list_at_start=False)

    async def scenario() -> None:
        async with app.run_test() as pilot:
            await wait_until(pilot, lambda: app.failure is not None, what="failure")

    asyncio.run(scenario())
    assert str(app.failure) == "/models/x.gguf: bad magic"
    assert app.return_code == 1
