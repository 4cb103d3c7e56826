"""End to end: the chat app on a real miniature GGUF through llama.cpp (the lead's `mini_gguf_f32` fixture)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.app.chats.store import ChatStore
from corral.app.runtime.api import Message, SamplingSettings
from corral.tui.app import make_app
from corral.tui.prompt_input import PromptInput
from tests.helpers.fake_engine import chat_ready, wait_until


@pytest.mark.slow
def test_chat_with_real_miniature_gguf(mini_gguf_f32: Path, tmp_path: Path) -> None:
    from corral.app.runtime.engine import EngineOptions, load_engine

    progress_seen: list[float] = []

    def factory(progress, cancel):  # type: ignore[no-untyped-def]
        def record(fraction: float) -> None:
            progress_seen.append(fraction)
            progress(fraction)

        return load_engine(mini_gguf_f32, EngineOptions(n_ctx=512, n_threads=2), progress=record, cancel=cancel)

    settings = SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=24, seed=1)
    store = ChatStore(tmp_path / "chat.sqlite3")
    app = make_app(factory, store, settings, show_list_at_start=False, system_prompt="Be brief.")
    shown: list[str] = []

    async def scenario() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            chat = await chat_ready(pilot)
            assert chat.status.ctx_total == 512
            chat.query_one(PromptInput).load_text("Hello, who are you?")
            await pilot.press("enter")
            await wait_until(pilot, lambda: chat.job is None and len(chat.view.boxes()) == 2, timeout=120,
                             what="the reply")
            reply = chat.view.boxes()[1]
            shown.append(reply.content)
            assert reply.status in ("stop", "length")
            assert "tok/s" in chat.status.line() and chat.status.ctx_used > 0

    try:
        asyncio.run(scenario())
        assert progress_seen and progress_seen[-1] == pytest.approx(1.0)
        engine = app.engine
        assert engine is not None
        messages = [Message("system", "Be brief."), Message("user", "Hello, who are you?")]
        direct = engine.generate(messages, settings)  # the same greedy decode outside the UI
        assert direct.text.strip() and shown[0].strip() == direct.text.strip()
        (summary,) = store.list_conversations()
        saved = store.get(summary.id).messages
        assert [m.role for m in saved] == ["user", "assistant"]
        assert saved[1].content.strip() == direct.text.strip()
        assert saved[1].stats is not None and saved[1].stats.completion_tokens == direct.stats.completion_tokens
    finally:
        app.shutdown(timeout=30)
        store.close()
    assert app.engine is None


def test_chat_saves_the_kv_state_and_a_reopened_chat_restores_it(tmp_path: Path) -> None:
    """A reply ends → the conversation's KV state is on disk; reopening it restores the history's KV."""
    from corral.app.runtime.engine import load_engine
    from tests.helpers.engine import cpu_plan, write_tiny_gguf

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    settings = SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=6, seed=1)
    store = ChatStore(tmp_path / "chat.sqlite3")
    cached: list[int] = []

    def run(conversation_id: int | None, prompt: str) -> None:
        app = make_app(lambda progress, cancel: load_engine(tiny, plan=cpu_plan(), progress=progress, cancel=cancel),
                       store, settings, show_list_at_start=False, conversation_id=conversation_id)

        async def scenario() -> None:
            async with app.run_test(size=(100, 30)) as pilot:
                chat = await chat_ready(pilot)
                before = len(chat.view.boxes())
                chat.query_one(PromptInput).load_text(prompt)
                await pilot.press("enter")
                await wait_until(pilot, lambda: chat.job is None and len(chat.view.boxes()) == before + 2,
                                 timeout=120, what="the reply")

        try:
            asyncio.run(scenario())
            assert app.engine is not None
            cached.append(app.engine.last_cached_tokens)
        finally:
            app.shutdown(timeout=30)

    try:
        run(None, "Tell me about llamas " * 10)
        (summary,) = store.list_conversations()
        assert store.kv_states.sizes()[summary.id] > 0
        run(summary.id, "And alpacas?")
        first_prompt = store.get(summary.id).messages[0]
        assert cached[0] == 0
        assert cached[1] > len(first_prompt.content.split())  # the first exchange came back from disk
    finally:
        store.close()
