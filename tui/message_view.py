"""The conversation pane: one box per turn; the live reply grows by appending Markdown, never re-rendering history."""

from __future__ import annotations

import threading
import time

from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static

from corral.app.chats.store import EXPORT_NOTES

ROLE_LABELS = {"user": "You", "assistant": "Assistant", "system": "System", "ipython": "Tool result (typed by you)"}
STATUS_NOTES = {**EXPORT_NOTES, "error": "failed"}


class PieceBuffer:
    """Text pieces handed over from the generation thread to the UI thread (cheap append, batch drain)."""

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._lock = threading.Lock()

    def append(self, piece: str) -> None:
        with self._lock:
            self._pieces.append(piece)

    def drain(self) -> str:
        with self._lock:
            pieces, self._pieces = self._pieces, []
        return "".join(pieces)


class MessageBox(Vertical):
    """One turn: a role label and its text (Markdown for replies, plain text for the user)."""

    def __init__(self, role: str, content: str = "", *, status: str = "done", message_id: int | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.status = status
        self.message_id = message_id

    def compose(self):  # type: ignore[no-untyped-def]
        yield Static(ROLE_LABELS.get(self.role, self.role), classes="role", markup=False)
        if self.role == "assistant":
            yield Markdown(self.content, classes="body")
        else:
            yield Static(self.content, classes="body", markup=False)
        yield Static(self._note_text(), classes="note", markup=False)

    def _note_text(self) -> str:
        return f"({STATUS_NOTES[self.status]})" if self.status in STATUS_NOTES else ""

    def set_status(self, status: str) -> None:
        self.status = status
        note = self.query_one(".note", Static)
        note.update(self._note_text())
        note.display = bool(self._note_text())

    def on_mount(self) -> None:
        self.query_one(".note", Static).display = bool(self._note_text())


class ReplyBox(MessageBox):
    """The assistant turn being streamed: `append` adds Markdown while keeping the UI thread's CPU share small.

    A render happens at most every `min_interval` seconds and only while the UI thread has used less
    than `max_ui_share` of the wall time since the previous render (its layout and paint included),
    so a long reply renders less often instead of slowing the generation thread down; but at least
    every `max_gap` seconds, so the reply never looks stuck.
    """

    def __init__(self, *, min_interval: float = 0.1, max_ui_share: float = 0.025, max_gap: float = 1.0) -> None:
        super().__init__("assistant", "", status="streaming")
        self.min_interval = min_interval
        self.max_ui_share = max_ui_share
        self.max_gap = max_gap
        self._pending: list[str] = []
        self._busy = False
        self._last_wall = 0.0
        self._last_cpu = 0.0
        self.renders = 0

    def _may_render(self) -> bool:
        elapsed = time.monotonic() - self._last_wall
        if elapsed < self.min_interval:
            return False
        return elapsed >= self.max_gap or time.thread_time() - self._last_cpu <= self.max_ui_share * elapsed

    def queue(self, chunk: str) -> None:
        """Add text to the reply (rendered by the next `append`/`flush`)."""
        if chunk:
            self._pending.append(chunk)
            self.content += chunk

    async def append(self, chunk: str, *, force: bool = False) -> None:
        """Queue `chunk`; render what is queued when the budget allows (or `force`)."""
        self.queue(chunk)
        if self._busy or not self._pending or not (force or self._may_render()):
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._busy = True
        self._last_wall, self._last_cpu = time.monotonic(), time.thread_time()
        try:
            await self.query_one(Markdown).append(text)
            self.renders += 1
        finally:
            self._busy = False

    async def flush(self) -> None:
        """Render everything queued so far."""
        await self.append("", force=True)

    async def replace(self, text: str) -> None:
        """Replace the whole reply (used when the engine's final text differs from the stream)."""
        self._pending.clear()
        self.content = text
        await self.query_one(Markdown).update(text)


class MessageView(VerticalScroll):
    """Scrollable list of MessageBoxes, anchored to the bottom while a reply streams."""

    async def add_message(
        self, role: str, content: str, *, status: str = "done", message_id: int | None = None
    ) -> MessageBox:
        box = MessageBox(role, content, status=status, message_id=message_id)
        await self.mount(box)
        self.anchor()
        return box

    async def add_reply(self, *, min_interval: float = 0.1, max_ui_share: float = 0.025) -> ReplyBox:
        box = ReplyBox(min_interval=min_interval, max_ui_share=max_ui_share)
        await self.mount(box)
        self.anchor()
        return box

    def boxes(self) -> list[MessageBox]:
        return list(self.query(MessageBox))
