"""The prompt box: multi-line; Enter sends, ctrl+j (or shift/alt+enter) inserts a newline, Up/Down walk history."""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")


class PromptInput(TextArea):
    """Multi-line prompt with shell-like history (Up on the first line, Down on the last)."""

    class Submitted(Message):
        """The user pressed Enter with some text."""

        def __init__(self, prompt: PromptInput, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

    def __init__(self, history: list[str] | None = None, **kwargs: object) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)  # type: ignore[arg-type]
        self.prompt_history: list[str] = list(history or [])
        self._history_index: int | None = None
        self._draft = ""

    def remember(self, text: str) -> None:
        """Add a sent prompt to the history (no consecutive duplicates)."""
        if text and (not self.prompt_history or self.prompt_history[-1] != text):
            self.prompt_history.append(text)
        self._history_index = None

    def set_text(self, text: str, *, cursor_at_start: bool = False) -> None:
        """Replace the text; the cursor goes to the end (or the start, so Up keeps walking back)."""
        self.load_text(text)
        if cursor_at_start:
            self.move_cursor((0, 0))
        else:
            last = self.document.line_count - 1
            self.move_cursor((last, len(self.document.get_line(last))))

    async def _on_key(self, event: events.Key) -> None:
        key = event.key
        handled = True
        if key == "enter":
            if self.text.strip():
                self.post_message(self.Submitted(self, self.text))
        elif key in NEWLINE_KEYS:
            start, end = self.selection
            self.replace("\n", start, end, maintain_selection_offset=False)
        elif key == "up" and self.prompt_history and (self._browsing() or self.cursor_location[0] == 0):
            self._history_step(-1)
        elif key == "down" and self._history_index is not None and (self._browsing() or self._on_last_line()):
            self._history_step(+1)
        else:
            handled = False
        if handled:
            event.stop()
            event.prevent_default()

    def _browsing(self) -> bool:
        """A history entry is shown unedited: Up/Down keep walking the history."""
        return self._history_index is not None and self.text == self.prompt_history[self._history_index]

    def _on_last_line(self) -> bool:
        return self.cursor_location[0] == self.document.line_count - 1

    def _history_step(self, step: int) -> None:
        if self._history_index is None:
            if step > 0:
                return
            self._draft = self.text
            index = len(self.prompt_history) - 1
        else:
            index = self._history_index + step
        if index < 0:
            return
        if index >= len(self.prompt_history):
            self._history_index = None
            self.set_text(self._draft)
            return
        self._history_index = index
        self.set_text(self.prompt_history[index], cursor_at_start=step < 0)
