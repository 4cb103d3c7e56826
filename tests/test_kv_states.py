"""Saved KV states: keyed, validated, atomic, capped; a bad file is ignored with a reason, never trusted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.app.chats.kv_states import KVStateStore, max_bytes_from_env
from corral.app.runtime.state import StateKey, model_identity

KEY = StateKey(model_id="123-abc", n_ctx=4096, type_k="f16", type_v="f16", flash_attn=True, runtime="0.3.36")


def test_round_trip(tmp_path: Path) -> None:
    store = KVStateStore(tmp_path, max_bytes=1 << 20)
    assert store.save(7, KEY, [1, 2, 3], b"state-bytes")
    found = store.load(7, KEY)
    assert found.problem == ""
    assert found.state is not None
    assert found.state.tokens == (1, 2, 3)
    assert found.state.data == b"state-bytes"
    assert store.sizes() == {7: store.path(7).stat().st_size}
    assert not list(tmp_path.glob("*.tmp*")), "no temporary file left behind"


def test_missing_is_not_a_problem(tmp_path: Path) -> None:
    found = KVStateStore(tmp_path).load(1, KEY)
    assert found.state is None and found.problem == ""


@pytest.mark.parametrize("field,value", [("model_id", "999-def"), ("n_ctx", 8192), ("type_k", "q8_0"),
                                         ("flash_attn", False), ("runtime", "0.3.37")])
def test_other_settings_are_refused(tmp_path: Path, field: str, value: object) -> None:
    store = KVStateStore(tmp_path, max_bytes=1 << 20)
    store.save(1, KEY, [5, 6], b"x" * 100)
    other = StateKey(**{**KEY.__dict__, field: value})
    found = store.load(1, other)
    assert found.state is None
    assert "other model or context settings" in found.problem


def _corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip-data":
        raw[-1] ^= 0xFF
    elif how == "truncate":
        raw = raw[: len(raw) // 2]
    elif how == "magic":
        raw[:8] = b"NOTOURS!"
    elif how == "header":
        raw[20:30] = b"\xff" * 10
    elif how == "empty":
        raw = bytearray()
    elif how == "huge-header":
        raw[12:16] = (0xFFFFFFFF).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["flip-data", "truncate", "magic", "header", "empty", "huge-header"])
def test_damaged_files_are_ignored_with_a_reason(tmp_path: Path, how: str) -> None:
    store = KVStateStore(tmp_path, max_bytes=1 << 20)
    store.save(3, KEY, list(range(50)), os.urandom(4000))
    _corrupt(store.path(3), how)
    found = store.load(3, KEY)
    assert found.state is None
    assert "ignored" in found.problem and store.path(3).name in found.problem


def test_cap_drops_oldest_first(tmp_path: Path) -> None:
    store = KVStateStore(tmp_path, max_bytes=10_000)
    for cid in (1, 2, 3):
        assert store.save(cid, KEY, [cid], b"z" * 3000)
        os.utime(store.path(cid), (1000 + cid, 1000 + cid))  # explicit ages: 1 oldest
    assert store.save(4, KEY, [4], b"z" * 3000)
    assert sorted(store.sizes()) == [2, 3, 4]
    assert sum(store.sizes().values()) <= 10_000


def test_a_state_larger_than_the_cap_is_not_written(tmp_path: Path) -> None:
    store = KVStateStore(tmp_path, max_bytes=1000)
    assert not store.save(1, KEY, [1], b"z" * 5000)
    assert store.sizes() == {}


def test_delete(tmp_path: Path) -> None:
    store = KVStateStore(tmp_path, max_bytes=1 << 20)
    store.save(9, KEY, [1], b"a")
    store.delete(9)
    store.delete(9)  # twice is fine
    assert store.load(9, KEY).state is None


def test_cap_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_KV_CACHE_MAX", "2GiB")
    assert max_bytes_from_env() == 2 * 1024**3
    monkeypatch.setenv("CORRAL_KV_CACHE_MAX", "0")
    assert max_bytes_from_env() == 0
    assert not KVStateStore(max_bytes=0).save(1, KEY, [1], b"a")


def test_model_identity_follows_content_not_path(tmp_path: Path) -> None:
    a = tmp_path / "a.gguf"
    a.write_bytes(b"HEADER" + b"\0" * 100)
    moved = tmp_path / "sub" / "b.gguf"
    moved.parent.mkdir()
    moved.write_bytes(a.read_bytes())
    assert model_identity([a], 6) == model_identity([moved], 6)
    other = tmp_path / "c.gguf"
    other.write_bytes(b"HEADEX" + b"\0" * 100)
    assert model_identity([other], 6) != model_identity([a], 6)
    longer = tmp_path / "d.gguf"
    longer.write_bytes(a.read_bytes() + b"\0")
    assert model_identity([longer], 6) != model_identity([a], 6)
