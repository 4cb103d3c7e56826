"""The chat store: conversations and their messages in SQLite (WAL) under the data directory.

Durability rules the chat relies on:
- the user turn is committed before generation starts (`add_message`);
- the reply row is created at the first token with status `streaming` and rewritten as it grows
  (`update_reply`), so a crash or kill loses at most the last unsaved fraction of a second;
- a stopped reply keeps its partial text with status `cancelled`.
A corrupt, locked or unwritable database raises `StoreError` carrying its path; it is never replaced.
"""

from __future__ import annotations

import datetime as _dt
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from corral.app import locations
from corral.app.chats.kv_states import KV_FOLDER, KVStateStore
from corral.app.runtime.api import GenerationStats, Message
from corral.convert.atomic import atomic_output
from corral.convert.errors import StoreError

SCHEMA_VERSION = 1
STORE_FILENAME = "chat.sqlite3"
TITLE_CHARS = 60
# Statuses: user turns are `done`; replies go `streaming` -> `stop` | `length` | `cancelled` | `error`.
FINAL_STATUSES = ("stop", "length", "cancelled", "error")
# How an unfinished reply is marked in a Markdown export.
EXPORT_NOTES = {"cancelled": "stopped", "streaming": "interrupted", "length": "cut at the token limit", "error": "error"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'done',
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    prompt_seconds REAL,
    generation_seconds REAL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


def default_store_path() -> Path:
    """`<data dir>/chat.sqlite3` (CORRAL_HOME overrides the data dir)."""
    return locations.data_dir() / STORE_FILENAME


def make_title(text: str) -> str:
    """A conversation title from the first user message: one line, at most TITLE_CHARS characters."""
    line = " ".join(text.split())
    if not line:
        return "(empty)"
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: str
    content: str
    status: str
    created_at: float
    stats: GenerationStats | None = None

    @property
    def interrupted(self) -> bool:
        """A reply that never finished (the process died while it streamed)."""
        return self.status == "streaming"

    def as_message(self) -> Message:
        return Message(self.role, self.content)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    title: str
    model: str
    updated_at: float
    n_messages: int


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    model: str
    system_prompt: str
    created_at: float
    updated_at: float
    messages: tuple[StoredMessage, ...] = ()

    def history(self) -> list[Message]:
        """System prompt (if any) plus every stored turn, as engine messages."""
        out = [Message("system", self.system_prompt)] if self.system_prompt else []
        out.extend(m.as_message() for m in self.messages if m.content or m.role == "user")
        return out


def _explain(exc: sqlite3.Error) -> str:
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return f"chat store is locked by another process ({text}); close the other corral chat and retry"
    if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        return f"chat store is corrupt ({text}); move the file aside to start a fresh one"
    if "readonly" in lowered or "read-only" in lowered:
        return f"chat store is read-only ({text})"
    if "unable to open" in lowered:
        return f"cannot open the chat store ({text})"
    return f"chat store error: {text}"


class ChatStore:
    """Conversations in one SQLite file; every method commits before it returns."""

    def __init__(self, path: str | Path | None = None, *, timeout: float = 2.0) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the chat store folder ({exc.strerror})", path=self.path) from exc
        if self.path.is_dir():
            raise StoreError("chat store path is a directory", path=self.path)
        self._db: sqlite3.Connection | None = None
        try:
            with self._guard():
                self._open(timeout)
        except BaseException:
            self._close_quietly()
            raise

    def _open(self, timeout: float) -> None:
        db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db = db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"chat store cannot use WAL journaling (got {mode})", path=self.path)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreError(f"chat store is corrupt ({check}); move the file aside", path=self.path)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"chat store was written by a newer corral (schema {version})", path=self.path)
        if version < SCHEMA_VERSION:
            db.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); executescript manages its own commit
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialize access and turn sqlite3 errors into StoreError(path=...)."""
        try:
            with self._lock:
                yield
        except sqlite3.Error as exc:
            raise StoreError(_explain(exc), path=self.path) from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("chat store is closed", path=self.path)
        return self._db

    def _close_quietly(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def close(self) -> None:
        """Checkpoint and close the database."""
        with self._lock:
            self._close_quietly()

    def __enter__(self) -> ChatStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conversations ----------------------------------------------------------------------------

    def new_conversation(self, *, model: str = "", system_prompt: str = "", title: str = "") -> int:
        """Create an empty conversation and return its id."""
        now = time.time()
        with self._guard(), self._transaction() as db:
            cur = db.execute(
                "INSERT INTO conversations (title, model, system_prompt, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (title, model, system_prompt, now, now),
            )
            return int(cur.lastrowid or 0)

    def list_conversations(self) -> list[ConversationSummary]:
        """Every conversation, most recently updated first."""
        with self._guard():
            rows = self._conn().execute(
                "SELECT c.id, c.title, c.model, c.updated_at, COUNT(m.id) FROM conversations c"
                " LEFT JOIN messages m ON m.conversation_id = c.id GROUP BY c.id"
                " ORDER BY c.updated_at DESC, c.id DESC"
            ).fetchall()
        return [ConversationSummary(int(r[0]), r[1], r[2], float(r[3]), int(r[4])) for r in rows]

    def get(self, conversation_id: int) -> Conversation:
        """One conversation with its messages in order; StoreError when it does not exist."""
        with self._guard():
            db = self._conn()
            row = db.execute(
                "SELECT id, title, model, system_prompt, created_at, updated_at FROM conversations WHERE id = ?",
                (conversation_id,),
            ).fetchone()
            if row is None:
                raise StoreError(f"no conversation with id {conversation_id}", path=self.path)
            rows = db.execute(
                "SELECT id, role, content, status, created_at, prompt_tokens, completion_tokens,"
                " prompt_seconds, generation_seconds FROM messages WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        messages = tuple(_row_to_message(r) for r in rows)
        return Conversation(int(row[0]), row[1], row[2], row[3], float(row[4]), float(row[5]), messages)

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete the conversation, its messages and its saved KV state."""
        with self._guard(), self._transaction() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        self.kv_states.delete(conversation_id)

    @property
    def kv_states(self) -> KVStateStore:
        """The conversations' saved KV caches, in `kv/` beside the store file."""
        return KVStateStore(self.path.parent / KV_FOLDER)

    def last_conversation_id(self) -> int:
        """The most recently updated conversation; StoreError when there is none."""
        rows = self.list_conversations()
        if not rows:
            raise StoreError("no saved conversation to continue (start one with --save)", path=self.path)
        return rows[0].id

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        with self._guard(), self._transaction() as db:
            db.execute(
                "UPDATE conversations SET system_prompt = ?, updated_at = ? WHERE id = ?",
                (system_prompt, time.time(), conversation_id),
            )

    # -- messages ---------------------------------------------------------------------------------

    def add_message(self, conversation_id: int, role: str, content: str, *, status: str = "done") -> int:
        """Append a turn (committed on return); the first user turn titles an untitled conversation."""
        now = time.time()
        with self._guard(), self._transaction() as db:
            cur = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, created_at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, status, now),
            )
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
            if role == "user":
                db.execute(
                    "UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                    (make_title(content), conversation_id),
                )
            return int(cur.lastrowid or 0)

    def start_reply(self, conversation_id: int, content: str = "") -> int:
        """Create the assistant row (status `streaming`) for a reply that has begun."""
        return self.add_message(conversation_id, "assistant", content, status="streaming")

    def update_reply(
        self, message_id: int, content: str, *, status: str = "streaming", stats: GenerationStats | None = None
    ) -> None:
        """Rewrite a reply's text (and final status and stats once it ends)."""
        values = (
            (stats.prompt_tokens, stats.completion_tokens, stats.prompt_seconds, stats.generation_seconds)
            if stats
            else (None, None, None, None)
        )
        with self._guard(), self._transaction() as db:
            db.execute(
                "UPDATE messages SET content = ?, status = ?, prompt_tokens = ?, completion_tokens = ?,"
                " prompt_seconds = ?, generation_seconds = ? WHERE id = ?",
                (content, status, *values, message_id),
            )
            db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id ="
                " (SELECT conversation_id FROM messages WHERE id = ?)",
                (time.time(), message_id),
            )

    def delete_message(self, message_id: int) -> None:
        with self._guard(), self._transaction() as db:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    # -- export -----------------------------------------------------------------------------------

    def export_markdown(self, conversation_id: int) -> str:
        """The conversation as a Markdown document."""
        conv = self.get(conversation_id)
        created = _dt.datetime.fromtimestamp(conv.created_at, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"# {conv.title or 'Untitled conversation'}", ""]
        if conv.model:
            lines.append(f"- model: `{conv.model}`")
        lines += [f"- created: {created}", ""]
        if conv.system_prompt:
            lines += ["## System", "", conv.system_prompt.rstrip(), ""]
        for message in conv.messages:
            lines += [f"## {message.role.capitalize()}", "", message.content.rstrip(), ""]
            if message.status in EXPORT_NOTES:
                lines += [f"*({EXPORT_NOTES[message.status]})*", ""]
        return "\n".join(lines).rstrip() + "\n"

    def write_markdown(self, conversation_id: int, target: str | Path) -> Path:
        """Export to `target` atomically; return the path."""
        text = self.export_markdown(conversation_id)
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return target


def _row_to_message(r: tuple) -> StoredMessage:
    stats = None
    if r[5] is not None and r[6] is not None:
        stats = GenerationStats(
            prompt_tokens=int(r[5]),
            completion_tokens=int(r[6]),
            prompt_seconds=float(r[7] or 0.0),
            generation_seconds=float(r[8] or 0.0),
            stop_reason=r[3] if r[3] in ("stop", "length", "cancelled") else "stop",
        )
    return StoredMessage(int(r[0]), r[1], r[2], r[3], float(r[4]), stats)
