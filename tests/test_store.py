"""The chat store: durability (user turn first, partial replies), corrupt/locked databases, export."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from corral.app.chats.store import SCHEMA_VERSION, ChatStore, default_store_path, make_title
from corral.app.runtime.api import GenerationStats, Message
from corral.convert.errors import StoreError


@pytest.fixture
def store(tmp_path: Path) -> ChatStore:
    s = ChatStore(tmp_path / "chat.sqlite3")
    yield s
    s.close()


def test_default_path_follows_corral_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / "data" / "chat.sqlite3"
    with ChatStore() as s:
        assert s.path == tmp_path / "home" / "data" / "chat.sqlite3"
        assert s.path.exists()


def test_wal_mode_and_schema_version(store: ChatStore) -> None:
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_roundtrip_title_stats_and_order(store: ChatStore) -> None:
    first = store.new_conversation(model="m.gguf", system_prompt="Be brief.")
    store.add_message(first, "user", "  What is   the\ncapital of France?  ")
    reply = store.start_reply(first)
    store.update_reply(reply, "Par", status="streaming")
    stats = GenerationStats(12, 3, 0.5, 0.25, "stop")
    store.update_reply(reply, "Paris.", status="stop", stats=stats)
    time.sleep(0.01)
    second = store.new_conversation(model="m.gguf")
    store.add_message(second, "user", "x" * 100)

    conv = store.get(first)
    assert conv.title == "What is the capital of France?"
    assert conv.system_prompt == "Be brief."
    assert [(m.role, m.content, m.status) for m in conv.messages] == [
        ("user", "  What is   the\ncapital of France?  ", "done"),
        ("assistant", "Paris.", "stop"),
    ]
    assert conv.messages[1].stats == stats
    assert conv.history() == [
        Message("system", "Be brief."),
        Message("user", "  What is   the\ncapital of France?  "),
        Message("assistant", "Paris."),
    ]
    summaries = store.list_conversations()
    assert [s.id for s in summaries] == [second, first]  # newest first
    assert summaries[0].title == "x" * 59 + "…" and len(summaries[0].title) == 60
    assert summaries[1].n_messages == 2


def test_title_only_from_first_user_message(store: ChatStore) -> None:
    cid = store.new_conversation()
    store.add_message(cid, "user", "first question")
    store.add_message(cid, "user", "second question")
    assert store.get(cid).title == "first question"
    assert make_title("   ") == "(empty)"


def test_user_turn_visible_to_another_connection_at_once(store: ChatStore) -> None:
    cid = store.new_conversation()
    store.add_message(cid, "user", "saved before generation")
    other = sqlite3.connect(store.path)
    rows = other.execute("SELECT role, content FROM messages").fetchall()
    other.close()
    assert rows == [("user", "saved before generation")]


def test_delete_conversation_removes_messages(store: ChatStore) -> None:
    cid = store.new_conversation()
    store.add_message(cid, "user", "hi")
    store.start_reply(cid, "hello")
    store.delete_conversation(cid)
    assert store.list_conversations() == []
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    db.close()
    with pytest.raises(StoreError, match="no conversation with id"):
        store.get(cid)


def test_kill_during_reply_keeps_user_turn_and_partial_reply(tmp_path: Path) -> None:
    """SIGKILL while a reply streams: the user turn and the last saved partial survive."""
    path = tmp_path / "chat.sqlite3"
    script = textwrap.dedent(f"""
        import sys, time
        from corral.app.chats.store import ChatStore
        s = ChatStore({str(path)!r})
        cid = s.new_conversation(model="m")
        s.add_message(cid, "user", "tell me a story")
        rid = s.start_reply(cid, "Once")
        s.update_reply(rid, "Once upon a time")
        print("ready", flush=True)
        while True:
            time.sleep(1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with ChatStore(path) as s:
        (summary,) = s.list_conversations()
        conv = s.get(summary.id)
        assert [(m.role, m.content) for m in conv.messages] == [
            ("user", "tell me a story"),
            ("assistant", "Once upon a time"),
        ]
        assert conv.messages[1].interrupted


def test_corrupt_database_reported_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "chat.sqlite3"
    garbage = b"this is not sqlite at all\x00" * 200
    path.write_bytes(garbage)
    with pytest.raises(StoreError) as info:
        ChatStore(path)
    assert str(path) in str(info.value) and "corrupt" in str(info.value)
    assert info.value.path == str(path)
    assert path.read_bytes() == garbage


def test_damaged_pages_reported(tmp_path: Path) -> None:
    path = tmp_path / "chat.sqlite3"
    with ChatStore(path) as s:
        cid = s.new_conversation()
        for i in range(200):
            s.add_message(cid, "user", f"message {i} " * 20)
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096
    data[2 * 4096: 3 * 4096] = b"\xff" * 4096  # smash a b-tree page
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as info:
        ChatStore(path)
    assert str(path) in str(info.value)


def test_locked_database_reported(tmp_path: Path) -> None:
    path = tmp_path / "chat.sqlite3"
    with ChatStore(path) as s:
        cid = s.new_conversation()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        s2 = ChatStore(path, timeout=0.2)  # WAL readers may open; writing must fail clearly
        with pytest.raises(StoreError) as info:
            s2.add_message(cid, "user", "blocked")
        assert "locked" in str(info.value) and str(path) in str(info.value)
        s2.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with ChatStore(path) as s3:  # nothing half-written, usable again
        assert s3.get(cid).messages == ()


def test_locked_while_switching_to_wal(tmp_path: Path) -> None:
    path = tmp_path / "chat.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)  # a rollback-journal database held exclusively
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO t VALUES (1)")
    try:
        with pytest.raises(StoreError, match="locked"):
            ChatStore(path, timeout=0.1)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "chat.sqlite3"
    ChatStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer corral"):
        ChatStore(path)


def test_directory_path_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(StoreError, match="directory"):
        ChatStore(tmp_path / "dir.sqlite3")


def test_export_markdown(store: ChatStore, tmp_path: Path) -> None:
    cid = store.new_conversation(model="Mini.gguf", system_prompt="You are terse.")
    store.add_message(cid, "user", "Show code")
    rid = store.start_reply(cid, "```python\nprint(1)\n```")
    store.update_reply(rid, "```python\nprint(1)\n```", status="cancelled")
    text = store.export_markdown(cid)
    assert text.startswith("# Show code\n\n- model: `Mini.gguf`\n- created: ")
    body = text.split("\n\n", 2)[2]
    assert body == (
        "## System\n\nYou are terse.\n\n## User\n\nShow code\n\n"
        "## Assistant\n\n```python\nprint(1)\n```\n\n*(stopped)*\n"
    )
    target = store.write_markdown(cid, tmp_path / "out" / "chat.md")
    assert target.read_text(encoding="utf-8") == text
    assert [p.name for p in target.parent.iterdir()] == ["chat.md"]  # no temp files left


def test_closed_store_raises(store: ChatStore) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_conversations()
