"""The conversation pane: one box per turn; the live reply grows by appending Markdown, never re-rendering history."""

from __future__ import annotations

import threading
import time

from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static

ROLE_LABELS = {"user": "You", "assistant": "Assistant", "system": "System"}
STATUS_NOTES = {
    "cancelled": "stopped",
    "streaming": "interrupted",
    "length": "cut at the token limit",
    "error": "failed",
}


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
    """The assistant turn being streamed: `append` adds Markdown at a bounded frame rate."""

    def __init__(self, *, min_interval: float = 1 / 15) -> None:
        super().__init__("assistant", "", status="streaming")
        self.min_interval = min_interval
        self._pending: list[str] = []
        self._busy = False
        self._next_at = 0.0

    async def append(self, chunk: str, *, force: bool = False) -> None:
        """Queue `chunk`; render queued text unless the last render was too recent (or `force`)."""
        if chunk:
            self._pending.append(chunk)
            self.content += chunk
        if self._busy or not self._pending:
            return
        now = time.monotonic()
        if not force and now < self._next_at:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._busy = True
        try:
            await self.query_one(Markdown).append(text)
        finally:
            self._busy = False
        spent = time.monotonic() - now
        # Keep the UI thread's share small so the generation thread keeps the CPU (and the GIL).
        self._next_at = time.monotonic() + max(self.min_interval, 3 * spent)

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

    def clear_messages(self) -> None:
        self.remove_children()

    async def add_message(
        self, role: str, content: str, *, status: str = "done", message_id: int | None = None
    ) -> MessageBox:
        box = MessageBox(role, content, status=status, message_id=message_id)
        await self.mount(box)
        self.anchor()
        return box

    async def add_reply(self, *, min_interval: float = 1 / 15) -> ReplyBox:
        box = ReplyBox(min_interval=min_interval)
        await self.mount(box)
        self.anchor()
        return box

    def boxes(self) -> list[MessageBox]:
        return list(self.query(MessageBox))
