"""ctrl+o: saved conversations, titled by their first user message; resume, delete, export, or start a new one."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from corral.app.chats.store import ChatStore, ConversationSummary
from corral.convert.errors import CorralError

NEW_ID = "new"


@dataclass(frozen=True)
class ListChoice:
    """What the user picked: a conversation id to resume, or None for a new conversation."""

    conversation_id: int | None


def export_name(summary_id: int, title: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)[:40] or "chat"
    return f"corral-chat-{summary_id}-{slug}.md"


def export_conversation(store: ChatStore, conversation_id: int, export_dir: Path) -> Path:
    """Write one conversation as Markdown into `export_dir` (named after its title); return the file."""
    title = store.get(conversation_id).title
    return store.write_markdown(conversation_id, export_dir / export_name(conversation_id, title))


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


class ConversationListScreen(ModalScreen[ListChoice | None]):
    """Newest first; the first row starts a new conversation."""

    BINDINGS = [
        Binding("escape", "close", "Back"),
        Binding("n", "new", "New"),
        Binding("d,delete", "delete", "Delete"),
        Binding("e", "export", "Export"),
    ]

    def __init__(self, store: ChatStore, export_dir: Path, current_id: int | None = None) -> None:
        super().__init__()
        self.store = store
        self.export_dir = export_dir
        self.current_id = current_id
        self._armed_delete: int | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="list-box"):
            yield Static("Conversations", id="list-title")
            yield OptionList(id="conversations")
            yield Static("enter open · n new · d delete (twice) · e export · escape back", classes="hint")

    def on_mount(self) -> None:
        self.reload()

    def reload(self, highlight: int | None = None) -> None:
        try:
            summaries = self.store.list_conversations()
        except CorralError as exc:
            self.notify(str(exc), severity="error")
            summaries = []
        options = [Option(Text("+ New conversation", style="bold"), id=NEW_ID)]
        options += [Option(self._label(s), id=str(s.id)) for s in summaries]
        olist = self.query_one(OptionList)
        olist.clear_options()
        olist.add_options(options)
        index = 0
        wanted = highlight if highlight is not None else self.current_id
        for i, s in enumerate(summaries, start=1):
            if s.id == wanted:
                index = i
        olist.highlighted = index
        olist.focus()

    def _label(self, s: ConversationSummary) -> Text:
        text = Text(s.title or "(untitled)", style="bold" if s.id == self.current_id else "")
        text.append(f"\n  {s.n_messages} messages · {_when(s.updated_at)}", style="dim")
        if s.model:
            text.append(f" · {s.model}", style="dim")
        return text

    def _highlighted_id(self) -> int | None:
        olist = self.query_one(OptionList)
        if olist.highlighted is None:
            return None
        option_id = olist.get_option_at_index(olist.highlighted).id
        return None if option_id in (None, NEW_ID) else int(option_id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        option_id = event.option.id
        self.dismiss(ListChoice(None if option_id == NEW_ID else int(option_id or 0)))

    def action_new(self) -> None:
        self.dismiss(ListChoice(None))

    def action_close(self) -> None:
        self.dismiss(None)

    def action_delete(self) -> None:
        target = self._highlighted_id()
        if target is None:
            return
        if self._armed_delete != target:
            self._armed_delete = target
            self.notify("press d again to delete this conversation", severity="warning")
            return
        self._armed_delete = None
        try:
            self.store.delete_conversation(target)
        except CorralError as exc:
            self.notify(str(exc), severity="error")
            return
        if target == self.current_id:
            self.current_id = None
        self.notify("conversation deleted")
        self.reload()

    def action_export(self) -> None:
        target = self._highlighted_id()
        if target is None:
            return
        try:
            path = export_conversation(self.store, target, self.export_dir)
        except (CorralError, OSError) as exc:
            self.notify(str(exc), severity="error")
            return
        self.notify(f"exported to {path}")

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self._armed_delete = None
