"""`corral ask -c/--save`: one exchange added to a saved conversation, its KV cache kept on disk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.app.chats.kv_states import restore_conversation, save_conversation
from corral.app.chats.store import ChatStore
from corral.app.cli import ui
from corral.app.runtime.api import Generation, Message
from corral.app.runtime.state import Resumable
from corral.convert.errors import UsageError


def conversation_id(value: str, store: ChatStore) -> int:
    """-c's value: 'last' or a conversation id."""
    if value == "last":
        return store.last_conversation_id()
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"-c takes a conversation id (see `corral chat --list`), not {value!r}") from None


@dataclass
class SavedConversation:
    """The conversation an `ask` continues or starts, with what was restored for it."""

    store: ChatStore
    id: int
    history: list[Message]
    restored_tokens: int = 0

    @classmethod
    def open(cls, store: ChatStore, continue_id: str | None, *, system: str | None, model: str) -> SavedConversation:
        if continue_id is None:
            cid = store.new_conversation(model=model, system_prompt=system or "")
            return cls(store, cid, [Message("system", system)] if system else [])
        cid = conversation_id(continue_id, store)
        if system is not None:
            store.set_system_prompt(cid, system)
        return cls(store, cid, store.get(cid).history())

    def messages(self, prompt: str) -> list[Message]:
        return [*self.history, Message("user", prompt)]

    def restore(self, engine: Resumable) -> None:
        """Load the conversation's saved KV state into the engine, or say in one line why it was not used."""
        self.restored_tokens, problem = restore_conversation(engine, self.store.kv_states, self.id)
        if problem:
            ui.warn(problem)

    def record_prompt(self, prompt: str) -> int:
        """Commit the user turn before generating; returns the reply row to fill in."""
        self.store.add_message(self.id, "user", prompt)
        return self.store.start_reply(self.id)

    def record_reply(self, engine: Resumable, reply_id: int, result: Generation) -> dict[str, Any]:
        """Store the reply and the new KV state; the fields `--json` adds."""
        stats = result.stats
        self.store.update_reply(reply_id, result.text, status=stats.stop_reason, stats=stats)
        save_conversation(engine, self.store.kv_states, self.id)
        cached = engine.last_cached_tokens if self.restored_tokens else 0
        return {"conversation_id": self.id, "cached_tokens": cached}
