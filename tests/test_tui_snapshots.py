"""Snapshot tests of the main screens (fixed size, FakeEngine, fixed clocks and memory readings)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from corral.app.chats.store import ChatStore
from corral.app.runtime.api import SamplingSettings
from corral.tui.app import ChatApp, make_app
from corral.tui.memory_view import GpuUsage, LiveUsage
from corral.tui.prompt_input import PromptInput
from tests.helpers.fake_engine import FakeEngine, chat_ready, fake_plan, wait_until

SIZE = (100, 30)
GIB = 1024**3
REPLY = (
    "Here is a function:\n\n"
    "```python\n"
    "def add(a: int, b: int) -> int:\n"
    "    return a + b\n"
    "```\n\n"
    "It **adds** two numbers.\n"
)


def fixed_probe() -> LiveUsage:
    return LiveUsage(rss_bytes=101 * GIB, gpus=(GpuUsage(0, "NVIDIA GeForce RTX 4090", 22 * GIB, 24 * GIB, 21 * GIB),),
                     nvml=True)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ChatStore:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    s = ChatStore(tmp_path / "chat.sqlite3")
    yield s
    s.close()
    monkeypatch.delenv("TZ")
    time.tzset()


async def steady(pilot) -> None:  # type: ignore[no-untyped-def]
    """No cursors: nothing focused (a blinking cursor would make screenshots differ run to run)."""
    for screen in pilot.app.screen_stack:
        for widget in screen.query("Input, TextArea"):
            widget.cursor_blink = False
        screen.set_focus(None)
    await pilot.pause(0.05)


def open_screen(key: str):  # type: ignore[no-untyped-def]
    """A `run_before` that waits for the chat, presses `key` and lets the screen it opens settle."""

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        await chat_ready(pilot)
        await pilot.press(key)
        await pilot.pause(0.1)
        await steady(pilot)

    return run_before


def build(store: ChatStore, engine: FakeEngine, **options: object) -> ChatApp:
    options.setdefault("show_list_at_start", False)
    options.setdefault("memory_probe", fixed_probe)
    options.setdefault("memory_interval", 0)
    return make_app(lambda progress, cancel: engine, store, SamplingSettings(), **options)


def test_chat_after_reply(snap_compare, store: ChatStore) -> None:  # type: ignore[no-untyped-def]
    engine = FakeEngine([REPLY], model_name="Llama-3.1-8B-Instruct-Q4_K_M.gguf", n_ctx=8192)
    app = build(store, engine)

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        chat = await chat_ready(pilot)
        chat.query_one(PromptInput).load_text("Write an add function")
        await pilot.press("enter")
        await wait_until(pilot, lambda: chat.job is None and len(chat.view.boxes()) == 2, what="reply")
        await pilot.pause(0.1)
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_stopped_reply(snap_compare, store: ChatStore) -> None:  # type: ignore[no-untyped-def]
    engine = FakeEngine(["one two three four five six seven eight nine ten " * 40], hold_after=3)
    app = build(store, engine)

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        chat = await chat_ready(pilot)
        chat.query_one(PromptInput).load_text("count")
        await pilot.press("enter")
        await wait_until(pilot, engine.holding.is_set, what="the stream to reach its hold")
        job = chat.job
        await pilot.press("escape")
        await wait_until(pilot, job.done.is_set, what="the worker to end")
        await wait_until(pilot, lambda: chat.status.gen_tps >= 0, what="the engine's stats, which arrive after the stop")
        box = chat.view.boxes()[1]
        # make the screen independent of how far the stream got
        await box.replace("one two three")
        chat.status.ctx_used = 12
        await pilot.pause(0.1)
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_load_screen(snap_compare, store: ChatStore) -> None:  # type: ignore[no-untyped-def]
    reached = threading.Event()

    def factory(progress, cancel):  # type: ignore[no-untyped-def]
        progress(0.42)
        reached.set()
        cancel.wait(30)
        from corral.convert.errors import Cancelled

        raise Cancelled("model loading cancelled")

    app = make_app(factory, store, SamplingSettings(), model_label="Llama-3.1-405B-Instruct-IQ2_XXS.gguf",
                   load_detail="GPU0 20 GiB + RAM 100 GiB + disk 30 GiB", show_list_at_start=False)

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        await wait_until(pilot, reached.is_set, what="load start")
        await pilot.pause(0.2)
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_conversation_list(snap_compare, store: ChatStore) -> None:  # type: ignore[no-untyped-def]
    for title, n in (("How do I quantize 405B?", 4), ("Plan for two 3090s", 2), ("Explain KV cache", 6)):
        cid = store.new_conversation(model="Llama-3.1-70B-Instruct-Q4_K_M.gguf")
        for i in range(n):
            store.add_message(cid, "user" if i % 2 == 0 else "assistant", title if i == 0 else f"turn {i}")
    db = sqlite3.connect(store.path)
    db.execute("UPDATE conversations SET updated_at = 1767225600 + id * 3600")  # 2026-01-01 + id hours (UTC)
    db.commit()
    db.close()
    app = build(store, FakeEngine(), show_list_at_start=True)

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        await chat_ready(pilot)
        await wait_until(pilot, lambda: type(pilot.app.screen).__name__ == "ConversationListScreen", what="list")
        await pilot.pause(0.1)
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_memory_view(snap_compare, store: ChatStore) -> None:  # type: ignore[no-untyped-def]
    app = build(store, FakeEngine(plan=fake_plan(disk=True)))
    assert snap_compare(app, terminal_size=SIZE, run_before=open_screen("f3"))


def test_help_screen(snap_compare, store: ChatStore) -> None:  # type: ignore[no-untyped-def]
    app = build(store, FakeEngine())
    assert snap_compare(app, terminal_size=(100, 50), run_before=open_screen("f1"))


def test_settings_screen(snap_compare, store: ChatStore) -> None:  # type: ignore[no-untyped-def]
    app = make_app(lambda progress, cancel: FakeEngine(), store,
                   SamplingSettings(temperature=0.2, top_p=0.9, max_tokens=512, seed=42),
                   system_prompt="You are a concise assistant.", show_list_at_start=False)
    assert snap_compare(app, terminal_size=SIZE, run_before=open_screen("f2"))
