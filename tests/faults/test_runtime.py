"""Running a model: not enough memory is refused before loading, context overflow is a clear message,
and the chat store never loses or silently replaces what was typed."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from .conftest import assert_clean_failure, invoke

ASK = ["--ctx", "256", "--max-tokens", "2", "--temperature", "0"]


# ------------------------------------------------------------------------------------ memory

def test_ask_refuses_before_loading_when_ram_is_short(mini_gguf_bf16: Path, monkeypatch) -> None:
    """A machine with 64 MiB of RAM and no swap: the plan refuses, with advice, and llama.cpp never loads."""
    import psutil

    import corral.app.runtime.engine as engine

    vm = namedtuple("svmem", "total available percent used free")(64 << 20, 32 << 20, 50.0, 32 << 20, 32 << 20)
    sw = namedtuple("sswap", "total used free percent sin sout")(0, 0, 0, 0.0, 0, 0)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm)
    monkeypatch.setattr(psutil, "swap_memory", lambda: sw)

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("llama.cpp was asked to load a model that does not fit")

    monkeypatch.setattr(engine, "build_params", no_load)
    result = invoke(["ask", "-m", str(mini_gguf_bf16), *ASK, "hello"])
    line = assert_clean_failure(result, names=mini_gguf_bf16, expect=r"fit", codes=(1,), after_load=True)
    assert "--force" in line or "tip" in line or "smaller" in line, f"no advice in {line!r}"


# ---------------------------------------------------------------------------- context overflow

def test_ask_context_overflow(mini_gguf_bf16: Path) -> None:
    prompt = "word " * 2000
    result = invoke(["ask", "-m", str(mini_gguf_bf16), "--ctx", "128", "--max-tokens", "2", prompt])
    assert_clean_failure(result, names=None, expect=r"context", codes=(2,), after_load=True)
    assert result.stdout == ""


def test_ask_truncate_fits_instead(mini_gguf_bf16: Path) -> None:
    prompt = "word " * 2000
    result = invoke(["ask", "-m", str(mini_gguf_bf16), "--ctx", "128", "--max-tokens", "2", "--temperature", "0",
                     "--truncate", prompt])
    assert result.exit_code == 0, result.stderr
    assert "dropped" in result.stderr


# ---------------------------------------------------------------------------------- chat store

def test_corrupt_store_is_reported_not_replaced(tmp_path: Path, monkeypatch) -> None:
    from corral.app.chats.store import default_store_path

    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    path = default_store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    garbage = b"SQLite format 3\x00" + os.urandom(4096)
    path.write_bytes(garbage)
    result = invoke(["chat", "--list"])
    assert_clean_failure(result, names=path, expect=r"corrupt|not a database|malformed", codes=(1,))
    assert path.read_bytes() == garbage


def test_locked_store_is_reported(tmp_path: Path, monkeypatch) -> None:
    from corral.app.chats.store import ChatStore, default_store_path

    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    path = default_store_path()
    with ChatStore(path) as store:
        store.new_conversation(model="m", title="kept")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        result = invoke(["chat", "--list"])
        assert time.monotonic() - start < 30
        assert_clean_failure(result, names=path, expect=r"lock|busy", codes=(1,))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with ChatStore(path) as store:
        assert [c.title for c in store.list_conversations()] == ["kept"]


_CRASH = """
import os, sys
from corral.app.chats.store import ChatStore
store = ChatStore(sys.argv[1])
cid = store.new_conversation(model="m")
store.add_message(cid, "user", "what I typed before the crash")
reply = store.start_reply(cid)
store.update_reply(reply, "half a rep")
os.kill(os.getpid(), 9)
"""


def test_kill_during_reply_loses_nothing_typed(tmp_path: Path) -> None:
    from corral.app.chats.store import ChatStore

    path = tmp_path / "chats.sqlite3"
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(path)], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    with ChatStore(path) as store:
        (summary,) = store.list_conversations()
        messages = store.get(summary.id).messages
    assert messages[0].role == "user" and messages[0].content == "what I typed before the crash"
    assert messages[1].role == "assistant" and messages[1].content == "half a rep"


@pytest.mark.parametrize("what", ["--list", "--export"])
def test_store_path_is_a_directory(what: str, tmp_path: Path, monkeypatch) -> None:
    from corral.app.chats.store import default_store_path

    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    path = default_store_path()
    path.mkdir(parents=True)
    args = ["chat", what] + (["1"] if what == "--export" else [])
    result = invoke(args)
    assert_clean_failure(result, names=path, expect=r"directory", codes=(1,))
    assert path.is_dir()
