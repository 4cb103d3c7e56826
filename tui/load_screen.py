"""The model-load screen: a progress bar (a 405B load takes minutes) that escape cancels."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import ProgressBar, Static


class LoadScreen(Screen[None]):
    """Shows load progress (0..1) for `model_label`; escape or ctrl+q asks the app to cancel."""

    BINDINGS = [Binding("escape", "cancel_load", "Cancel")]

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
            yield Static("escape cancels", id="load-hint")

    def set_progress(self, fraction: float) -> None:
        self.query_one(ProgressBar).update(progress=round(100 * min(max(fraction, 0.0), 1.0), 1))

    def action_cancel_load(self) -> None:
        if self.cancelling:
            return
        self.cancelling = True
        self.query_one("#load-hint", Static).update("cancelling…")
        self.app.post_message(self.CancelRequested())
