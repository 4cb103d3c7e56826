"""`corral ask --save` / `-c [ID]`: saved conversations through the real engine, with their KV state on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from corral.app.chats.store import ChatStore
from corral.app.cli.main import cli
from tests.helpers.engine import shared_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_gguf(tmp_path_factory)


def ask(tiny: Path, *args: str) -> Any:
    base = ["ask", "-m", str(tiny), "--temperature", "0", "--max-tokens", "10", "--threads", "1", "--ctx", "2048",
            "--json"]
    return CliRunner().invoke(cli, [*base, *args])


def _doc(result: Any) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_save_then_continue_restores_the_cache_and_keeps_greedy_tokens(tiny: Path) -> None:
    first = _doc(ask(tiny, "--save", "--system", "Be brief.", "Tell me about llamas " * 20))
    cid = first["conversation_id"]
    assert first["cached_tokens"] == 0
    with ChatStore() as store:
        conv = store.get(cid)
        assert [m.role for m in conv.messages] == ["user", "assistant"]
        assert conv.messages[1].content == first["text"] and conv.system_prompt == "Be brief."
        assert store.kv_states.sizes()[cid] > 0

    second = _doc(ask(tiny, "-c", str(cid), "And alpacas?"))
    assert second["conversation_id"] == cid
    # the whole first exchange's prompt was restored from disk rather than decoded again
    assert second["cached_tokens"] >= first["prompt_tokens"]
    assert second["prompt_tokens"] > second["cached_tokens"]

    # the same continuation without the saved state gives the same tokens
    with ChatStore() as store:
        store.kv_states.delete(cid)
        store.delete_message(store.get(cid).messages[-1].id)  # drop "And alpacas?"'s reply and prompt
        store.delete_message(store.get(cid).messages[-1].id)
    again = _doc(ask(tiny, "-c", "And alpacas?"))  # no id: the last conversation
    assert again["conversation_id"] == cid and again["cached_tokens"] == 0
    assert again["text"] == second["text"] and again["completion_tokens"] == second["completion_tokens"]


def test_a_damaged_state_is_ignored_with_one_line(tiny: Path) -> None:
    cid = _doc(ask(tiny, "--save", "Hello"))["conversation_id"]
    with ChatStore() as store:
        path = store.kv_states.path(cid)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = ask(tiny, "-c", str(cid), "Again")
    doc = _doc(result)
    assert doc["cached_tokens"] == 0
    assert "damaged" in result.stderr and result.stderr.count("saved KV state") == 1


def test_deleting_a_conversation_deletes_its_state(tiny: Path) -> None:
    cid = _doc(ask(tiny, "--save", "Hi"))["conversation_id"]
    with ChatStore() as store:
        assert cid in store.kv_states.sizes()
        store.delete_conversation(cid)
        assert cid not in store.kv_states.sizes()


@pytest.mark.parametrize("args,message", [
    (("-c", "--save", "x"), "not both"),
    (("-c", "999", "x"), "no conversation with id 999"),
])
def test_bad_uses_are_one_line_errors(tiny: Path, args: tuple[str, ...], message: str) -> None:
    result = ask(tiny, *args)
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.output


def test_continue_with_nothing_saved(tiny: Path) -> None:
    result = ask(tiny, "-c", "Hello")
    assert result.exit_code != 0 and "no saved conversation" in result.stderr
