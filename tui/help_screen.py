"""F1 / ?: every key of the chat, in one table."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

# (keys, what they do). Tests check that every binding of every corral screen is listed here.
KEY_HELP: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "Chat",
        [
            ("enter", "send the prompt"),
            ("ctrl+j / shift+enter / alt+enter", "insert a newline in the prompt"),
            ("up / down", "previous / next prompt from history (on the first / last line)"),
            ("escape", "stop the reply now (the partial reply is kept)"),
            ("ctrl+r", "regenerate the last reply"),
            ("ctrl+n", "new conversation"),
            ("ctrl+o", "conversation list (resume, delete, export)"),
            ("ctrl+s", "export this conversation to Markdown"),
            ("f2 / ctrl+t", "settings: system prompt, temperature, top-p, max tokens, seed"),
            ("f3 / ctrl+g", "memory view: the plan's split next to live usage"),
            ("f1 / ?", "this help (? when the prompt is not focused)"),
            ("tab / shift+tab", "move focus"),
            ("ctrl+q", "quit (a streaming reply is stopped and saved)"),
        ],
    ),
    (
        "Conversation list",
        [
            ("enter", "open the highlighted conversation (or start a new one)"),
            ("n", "new conversation"),
            ("d / delete", "delete the highlighted conversation (press twice)"),
            ("e", "export the highlighted conversation to Markdown"),
            ("escape", "back to the chat"),
        ],
    ),
    (
        "Settings",
        [("ctrl+s", "save"), ("escape", "cancel")],
    ),
    (
        "Loading, memory view, help",
        [
            ("escape", "cancel the model load (load screen)"),
            ("escape / q / f3", "close the memory view"),
            ("r", "refresh the memory view now"),
            ("escape / q / f1 / ?", "close this help"),
        ],
    ),
]


def listed_keys() -> set[str]:
    """Every single key named in KEY_HELP."""
    keys: set[str] = set()
    for _, rows in KEY_HELP:
        for combo, _what in rows:
            keys.update(part.strip() for part in combo.split("/"))
    return keys


class HelpScreen(ModalScreen[None]):
    """A modal table of keys; any of escape, q, f1 or ? closes it."""

    BINDINGS = [
        Binding("escape,q,f1,question_mark", "dismiss_help", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2), expand=False)
        table.add_column("Key", style="bold cyan", no_wrap=True)
        table.add_column("Action")
        for section, rows in KEY_HELP:
            table.add_row(f"[b]{section}[/b]", "")
            for combo, what in rows:
                table.add_row(combo, what)
            table.add_row("", "")
        with VerticalScroll(id="help-box"):
            yield Static("corral chat — keys", id="help-title")
            yield Static(table)
            yield Static("escape closes this help", classes="hint")

    def action_dismiss_help(self) -> None:
        self.dismiss(None)
