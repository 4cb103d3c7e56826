"""`corral chat` on the command line: --list, --export, and clear errors before any UI starts."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from corral.app.chats.store import ChatStore, default_store_path
from corral.app.cli.main import cli


def _seed() -> int:
    with ChatStore() as store:
        cid = store.new_conversation(model="m.gguf")
        store.add_message(cid, "user", "What is a GGUF file?")
        store.update_reply(store.start_reply(cid), "A model file format.", status="stop")
        return cid


def test_list_json_and_text() -> None:
    cid = _seed()
    runner = CliRunner()
    result = runner.invoke(cli, ["chat", "--list", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["id"] == cid and row["title"] == "What is a GGUF file?" and row["messages"] == 2
    text = runner.invoke(cli, ["chat", "--list"])
    assert text.exit_code == 0 and f"{cid:>5}" in text.stdout and "What is a GGUF file?" in text.stdout


def test_export_markdown_to_stdout() -> None:
    cid = _seed()
    result = CliRunner().invoke(cli, ["chat", "--export", str(cid)])
    assert result.exit_code == 0
    assert result.stdout.startswith("# What is a GGUF file?\n")
    assert result.stdout.endswith("## Assistant\n\nA model file format.\n")


def test_missing_model_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["chat"])
    assert result.exit_code == 2
    assert "missing -m/--model" in result.stderr


def test_unknown_conversation_fails_before_loading(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["chat", "-m", str(tmp_path / "nope.gguf"), "--resume", "999"])
    assert result.exit_code == 1
    assert "no conversation with id 999" in result.stderr


def test_not_a_terminal_is_refused(mini_gguf_f32: Path) -> None:
    result = CliRunner().invoke(cli, ["chat", "-m", str(mini_gguf_f32)])
    assert result.exit_code == 2
    assert "needs a terminal" in result.stderr


def test_bad_model_is_named_even_without_a_terminal(tmp_path: Path) -> None:
    model = tmp_path / "x.gguf"
    model.write_bytes(b"GGUF")
    result = CliRunner().invoke(cli, ["chat", "-m", str(model)])
    assert result.exit_code == 2
    assert str(model) in result.stderr and "not a GGUF file" in result.stderr


def test_corrupt_store_is_reported_with_its_path() -> None:
    path = default_store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"garbage" * 1000)
    result = CliRunner().invoke(cli, ["chat", "--list"])
    assert result.exit_code == 1
    assert str(path) in result.stderr and "corrupt" in result.stderr
    assert path.read_bytes() == b"garbage" * 1000  # not replaced


def test_list_shows_saved_kv_states() -> None:
    from corral.app.runtime.state import StateKey
    from corral.convert.units import format_bytes

    cid, other = _seed(), _seed()
    with ChatStore() as store:
        key = StateKey("1-a", 512, "f16", "f16", True, "test")
        assert store.kv_states.save(cid, key, [1, 2, 3], b"k" * 5000)
        size = store.kv_states.sizes()[cid]
    runner = CliRunner()
    rows = {r["id"]: r for r in json.loads(runner.invoke(cli, ["chat", "--list", "--json"]).stdout)}
    assert rows[cid]["kv_state_bytes"] == size and rows[other]["kv_state_bytes"] == 0
    lines = {int(line.split()[0]): line for line in runner.invoke(cli, ["chat", "--list"]).stdout.splitlines()}
    assert f"KV {format_bytes(size)}" in lines[cid] and "no KV" in lines[other]


def test_tools_file_is_read_before_the_model_and_help_says_nothing_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["chat", "-m", str(tmp_path / "nope.gguf"), "--tools", str(tmp_path / "t.json")])
    assert result.exit_code == 2
    assert "cannot read the tools file" in result.stderr
    (tmp_path / "t.json").write_text("[]", encoding="utf-8")
    result = CliRunner().invoke(cli, ["chat", "-m", str(tmp_path / "nope.gguf"), "--tools", str(tmp_path / "t.json")])
    assert result.exit_code == 2 and "lists no tools" in result.stderr
    help_text = CliRunner().invoke(cli, ["chat", "--help"]).stdout
    assert "--tools FILE" in help_text and "corral runs none of them" in help_text
