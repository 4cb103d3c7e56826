"""The command line: every subcommand has help, errors are one line with the right exit code."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from corral.app.cli.main import cli

COMMANDS = ["plan", "convert", "quantize", "imatrix", "download", "info", "ask", "chat", "demo", "serve"]


def test_top_level_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and name in result.output
    # the one-line description is shown
    assert len(result.output.splitlines()) > 3


def test_nothing_generic_is_importable() -> None:
    for generic in ("app", "convert", "offload", "tui"):
        spec = importlib.util.find_spec(generic)
        # the repository root may be on sys.path when pytest runs from it; the installed
        # distribution must not provide these names
        if spec is not None and spec.origin is not None:
            assert Path(spec.origin).resolve().parent.parent == Path(__file__).resolve().parent.parent
    for name in ("corral.app", "corral.convert", "corral.offload", "corral.tui"):
        assert importlib.util.find_spec(name) is not None


def test_console_script_runs_outside_the_repo(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "corral"
    out = subprocess.run([str(exe), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "corral" in out.stdout
    probe = "import importlib.util as u; print([u.find_spec(n) is None for n in ('app','convert','offload','tui')])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[True, True, True, True]"


def test_info_on_missing_file_is_one_line_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_info_json_on_converted_model(mini_gguf_bf16: Path) -> None:
    result = CliRunner().invoke(cli, ["info", str(mini_gguf_bf16), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["architecture"] == "llama"
    assert doc["block_count"] == 2 and doc["head_count"] == 8 and doc["head_count_kv"] == 2
    assert doc["vocab_size"] == 128256 and doc["has_chat_template"] is True
    assert doc["file_type"] == "BF16"
    assert doc["split_count"] == 1
    assert set(doc["tensor_types"]) == {"BF16", "F32"}
    # parameters: 2 * vocab * hidden (untied) + layers
    assert doc["parameters"] > 2 * 128256 * 256
    human = CliRunner().invoke(cli, ["info", str(mini_gguf_bf16)])
    assert human.exit_code == 0 and "llama" in human.output and "128256" in human.output
