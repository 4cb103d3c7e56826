"""Malformed GGUF files through every command that reads one: a clear one-line error, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import (
    assert_clean_failure,
    command_args,
    fingerprint,
    invoke,
    run_corral,
    temp_leftovers,
)
from .corpus_gguf import gguf_cases

CASES = gguf_cases()
COMMANDS = ("info", "plan", "ask", "chat", "quantize")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_gguf_is_refused(case, command: str, corpus_dir: Path, tmp_path: Path, fake_tty: None) -> None:
    src = corpus_dir / f"{case.name}.gguf"
    before = src.read_bytes()
    out = tmp_path / "out.gguf"
    result = invoke(command_args(command, src, out))
    assert_clean_failure(result, names=src, expect=case.expect)
    assert src.read_bytes() == before
    assert not out.exists() and not temp_leftovers(tmp_path)


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_model_path(command: str, tmp_path: Path, fake_tty: None) -> None:
    missing = tmp_path / "no-such-model.gguf"
    result = invoke(command_args(command, missing, tmp_path / "out.gguf"))
    assert_clean_failure(result, names="no-such-model", expect=r"not found|no such", codes=(2,))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ("info", "plan", "quantize"))
def test_directory_instead_of_gguf(command: str, tmp_path: Path) -> None:
    folder = tmp_path / "a-folder.gguf"
    folder.mkdir()
    result = invoke(command_args(command, folder, tmp_path / "out.gguf"))
    assert_clean_failure(result, names="a-folder.gguf", expect=r"directory|folder|gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder.gguf"]


def test_missing_shard_of_split(corpus_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "m-00001-of-00002.gguf"
    shutil.copy(corpus_dir / "good.gguf", first)
    result = invoke(["info", str(first)])
    assert_clean_failure(result, names="m-00002-of-00002.gguf", expect=r"missing shard")


# The real executable: exactly what a user sees (exit code, one stderr line, --debug traceback).
@pytest.mark.parametrize("command", COMMANDS)
def test_real_cli_one_line_no_traceback(command: str, corpus_dir: Path, tmp_path: Path) -> None:
    src = corpus_dir / "offset_outside_file.gguf"
    out = tmp_path / "out.gguf"
    result = run_corral(command_args(command, src, out), tty=command == "chat")
    assert_clean_failure(result, names=src, expect=r"past the end of the file", codes=(2,))
    assert result.stdout.strip() == ""
    assert not out.exists() and not temp_leftovers(tmp_path)


def test_debug_shows_traceback(corpus_dir: Path) -> None:
    result = run_corral(["--debug", "info", str(corpus_dir / "truncated_in_kv.gguf")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "InvalidGGUF" in result.stderr


def test_valid_small_gguf_is_read(corpus_dir: Path) -> None:
    """The corpus' base file is valid: the failures above come from the mutations alone."""
    before = fingerprint(corpus_dir)
    result = invoke(["info", "--json", str(corpus_dir / "good.gguf")])
    assert result.exit_code == 0, result.stderr
    assert '"architecture": "llama"' in result.stdout
    assert fingerprint(corpus_dir) == before
