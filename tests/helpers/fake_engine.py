"""FakeEngine: a ChatEngine for tests with queued replies, per-token delay and deterministic stats."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from corral.app.chats.store import ChatStore
from corral.app.runtime.api import FitResult, Generation, GenerationStats, Message, SamplingSettings
from corral.app.runtime.chat_format import drop_oldest_turns
from corral.app.runtime.tools import ToolSet
from corral.convert.errors import ContextOverflow, EngineError
from corral.offload.plan import DevicePlan, Plan
from tests.helpers.plans import make_plan

_PIECES = re.compile(r"\s*\S+|\s+")


def split_tokens(text: str) -> list[str]:
    """Word-ish pieces (leading whitespace kept) whose concatenation is `text`."""
    return _PIECES.findall(text)


@dataclass
class FakeCall:
    messages: list[Message]
    settings: SamplingSettings
    tools: ToolSet | None = None


class FakeEngine:
    """Replies come from `replies` in order (then `default_reply`); each piece waits `token_delay` seconds.

    `hold_after=N`: after N pieces of a reply the generation stops streaming (`holding` is set) until it is
    cancelled, the engine is closed, or the test sets `release` -- so "still streaming" is a fact, not a race.

    Stats are deterministic: prompt speed `prompt_tps`, generation speed `gen_tps` (fake clocks), so
    screens that show tok/s can be snapshot-tested. `fail` (an exception) is raised by the next generate.
    """

    def __init__(
        self,
        replies: Sequence[str] = (),
        *,
        token_delay: float = 0.0,
        hold_after: int | None = None,
        n_ctx: int = 4096,
        model_name: str = "fake-model.gguf",
        default_reply: str = "OK.",
        prompt_tps: float = 200.0,
        gen_tps: float = 50.0,
        plan: Plan | None = None,
    ) -> None:
        self.replies: list[str] = list(replies)
        self.token_delay = token_delay
        self.hold_after = hold_after
        self.n_ctx = n_ctx
        self.model_name = model_name
        self.default_reply = default_reply
        self.prompt_tps = prompt_tps
        self.gen_tps = gen_tps
        self.plan = plan
        self.warnings: list[str] = list(plan.warnings) if plan is not None else []
        self.calls: list[FakeCall] = []
        self.fail: BaseException | None = None
        self.closed = False
        self.started = threading.Event()  # set when a generation emits its first piece
        self.holding = threading.Event()  # set while a reply is held (`hold_after`)
        self.release = threading.Event()  # set by a test to let a held reply go on
        self._busy = threading.Lock()

    def queue(self, *replies: str) -> None:
        self.replies.extend(replies)

    def count_prompt_tokens(self, messages: Sequence[Message], tools: ToolSet | None = None) -> int:
        """4 tokens of template per message plus one per word-ish piece (and per piece of the tools' JSON)."""
        tool_tokens = sum(len(split_tokens(f)) for f in tools.functions) if tools is not None else 0
        return sum(4 + len(split_tokens(m.content)) for m in messages) + 1 + tool_tokens

    def fit_messages(self, messages: Sequence[Message], reserve: int) -> FitResult:
        """Drop the oldest turns, then the oldest words of the last message, until `reserve` tokens are left."""
        limit = self.n_ctx - max(1, reserve)
        kept, dropped = drop_oldest_turns(messages, lambda ms: self.count_prompt_tokens(ms) <= limit)
        count = self.count_prompt_tokens(kept)
        cut = 0
        if count > limit and kept[-1].role != "system":
            words = split_tokens(kept[-1].content)
            cut = min(count - limit, len(words) - 1)
            kept[-1] = replace(kept[-1], content="".join(words[cut:]))
            count = self.count_prompt_tokens(kept)
        if count > limit:
            raise ContextOverflow(f"even after dropping older text the prompt is {count} tokens; {limit} fit")
        return FitResult(kept, count, dropped, cut)

    def generate(
        self,
        messages: Sequence[Message],
        settings: SamplingSettings,
        *,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        tools: ToolSet | None = None,
    ) -> Generation:
        if self.closed:
            raise EngineError("engine is closed")
        if not self._busy.acquire(blocking=False):
            raise EngineError("FakeEngine.generate called concurrently")
        try:
            self.calls.append(FakeCall(list(messages), settings, tools))
            if self.fail is not None:
                exc, self.fail = self.fail, None
                raise exc
            prompt_tokens = self.count_prompt_tokens(messages, tools)
            if prompt_tokens >= self.n_ctx:
                raise ContextOverflow(f"prompt is {prompt_tokens} tokens; the context holds {self.n_ctx}")
            reply = self.replies.pop(0) if self.replies else self.default_reply
            pieces = split_tokens(reply)
            room = self.n_ctx - prompt_tokens
            limit = min(settings.max_tokens, room) if settings.max_tokens > 0 else room
            out: list[str] = []
            reason = "stop"
            for index, piece in enumerate(pieces):
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if index >= limit:
                    reason = "length"
                    break
                out.append(piece)
                if on_text is not None:
                    on_text(piece)
                self.started.set()
                if self.token_delay:
                    time.sleep(self.token_delay)
                if index + 1 == self.hold_after:
                    self._hold(cancel)
            if cancel is not None and cancel.is_set() and reason == "stop" and len(out) < len(pieces):
                reason = "cancelled"
            stats = GenerationStats(
                prompt_tokens=prompt_tokens,
                completion_tokens=len(out),
                prompt_seconds=prompt_tokens / self.prompt_tps,
                generation_seconds=len(out) / self.gen_tps,
                stop_reason=reason,  # type: ignore[arg-type]
            )
            return Generation("".join(out), stats)
        finally:
            self._busy.release()

    def _hold(self, cancel: threading.Event | None) -> None:
        self.holding.set()
        try:
            while not (self.release.is_set() or self.closed or (cancel is not None and cancel.is_set())):
                self.release.wait(0.005)
        finally:
            self.holding.clear()

    def close(self) -> None:
        self.closed = True


# -- Pilot helpers shared by the TUI tests ----------------------------------------------------------


async def wait_until(pilot: object, condition: Callable[[], object], timeout: float = 60.0,
                     what: str = "condition") -> None:
    """Let the app run until `condition()` is true (AssertionError after `timeout` seconds: a hang guard)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)  # type: ignore[attr-defined]


async def replied(pilot: object, chat: object, boxes: int, what: str = "reply", timeout: float = 60.0) -> None:
    """Wait until no reply streams and the chat shows `boxes` messages."""
    await wait_until(pilot, lambda: chat.job is None and len(chat.view.boxes()) == boxes,  # type: ignore[attr-defined]
                     timeout=timeout, what=what)


async def chat_ready(pilot: object) -> object:
    """Wait for the model load to end and the chat screen to be up; return it."""
    from corral.tui.chat_screen import ChatScreen

    app = pilot.app  # type: ignore[attr-defined]
    await wait_until(pilot, lambda: app.chat_screen is not None and app.chat_screen.is_mounted, what="chat screen")
    await pilot.pause()  # type: ignore[attr-defined]
    screen = app.chat_screen
    assert isinstance(screen, ChatScreen)
    return screen


def fake_plan(disk: bool = True) -> Plan:
    """A real plan whose devices, warnings and speed read like a 405B Q2_K on one 24 GB card: GPU0 + CPU RAM
    (+ disk streaming)."""
    gib = 1024**3
    devices = [
        DevicePlan("GPU0", "gpu", "RTX 4090", 20 * gib, 2 * gib, gib // 2, gib // 2, 24 * gib, 1e12),
        DevicePlan("CPU", "cpu", "CPU", 100 * gib, 0, gib, 0, 128 * gib, 80e9),
    ]
    if disk:
        devices.append(DevicePlan("disk", "disk", "mmap from disk", 30 * gib, 0, 0, 0, 0, 3e9))
    return make_plan(devices=devices, warnings=["30.0 GiB of weights stream from disk on every token"] if disk else [],
                     headline="Llama 3.1 405B Q2_K: GPU0 + RAM + disk", tokens_per_second=0.4,
                     disk_stream_bytes=30 * gib if disk else 0)


def run_chat(app: object, scenario: Callable[[object, object], Awaitable[None]], **run_test: object) -> None:
    """Run `app` headless (`run_test` options) and await `scenario(pilot, chat)` once the chat screen is up."""

    async def main() -> None:
        async with app.run_test(**run_test) as pilot:  # type: ignore[attr-defined]
            await scenario(pilot, await chat_ready(pilot))

    asyncio.run(main())


@pytest.fixture(name="store")
def store_fixture(tmp_path: Path) -> Iterator[ChatStore]:
    """The `store` fixture: a chat store in the test's own folder (import it into a test module to use it)."""
    s = ChatStore(tmp_path / "chat.sqlite3")
    yield s
    s.close()
