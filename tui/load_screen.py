"""The model-load screen: a progress bar (a 405B load takes minutes) that escape cancels, and a prompt box.

What is typed while the model loads is not lost: the box's text (and cursor) is handed to the chat screen.
Enter during the load keeps the text in the box; it is sent with Enter once the chat is up.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import ProgressBar, Static

from .prompt_input import PromptInput

LOAD_HINT = "escape cancels"
EARLY_ENTER_HINT = "still loading: your message stays in the box; enter sends it once the model is ready"
LOAD_PLACEHOLDER = "Type your first message while the model loads."


@dataclass(frozen=True)
class Draft:
    """Text typed on the load screen and where its cursor was."""

    text: str = ""
    cursor: tuple[int, int] = (0, 0)


class LoadScreen(Screen[None]):
    """Shows load progress (0..1) for `model_label`; escape or ctrl+q asks the app to cancel."""

    BINDINGS = [Binding("escape", "cancel_load", "Cancel")]
    AUTO_FOCUS = "#load-prompt"

    class CancelRequested(Message):
        """The user asked to stop loading."""

    def __init__(self, model_label: str, detail: str = "") -> None:
        super().__init__()
        self.model_label = model_label
        self.detail = detail
        self.cancelling = False

    def compose(self) -> ComposeResult:
        with Vertical(id="load-box"):
            yield Static(f"Loading {self.model_label}", id="load-title", markup=False)
            if self.detail:
                yield Static(self.detail, id="load-detail", markup=False)
            yield ProgressBar(total=100, show_eta=False, id="load-bar")
            yield Static(LOAD_HINT, id="load-hint", markup=False)
        yield PromptInput(id="load-prompt", placeholder=LOAD_PLACEHOLDER)

    def set_progress(self, fraction: float) -> None:
        self.query_one(ProgressBar).update(progress=round(100 * min(max(fraction, 0.0), 1.0), 1))

    async def draft(self) -> Draft:
        """What the prompt box holds once it has handled the keys already sent to it."""
        prompt = self.query_one(PromptInput)
        settled = asyncio.Event()
        if prompt.call_later(settled.set):  # queued behind those keys
            await settled.wait()
        return Draft(prompt.text, prompt.cursor_location)

    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        """Enter before the model is ready: nothing to send to yet, so the text stays where it is."""
        event.stop()
        if not self.cancelling:
            self.query_one("#load-hint", Static).update(EARLY_ENTER_HINT)

    def action_cancel_load(self) -> None:
        if self.cancelling:
            return
        self.cancelling = True
        self.query_one("#load-hint", Static).update("cancelling…")
        self.app.post_message(self.CancelRequested())
