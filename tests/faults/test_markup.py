"""Markup in untrusted text (a GGUF's name, file paths, prompts, a chat template's output) is printed literally.

`corral info`, `corral plan` and `corral ask` must neither crash on it (Rich's MarkupError) nor style it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import assert_clean_failure, invoke
from .corpus_markup import EVIL, EVIL_FILE, evil_dir, raising_template, renamed_model, small_named_gguf

ASK = ["--ctx", "256", "--max-tokens", "2", "--temperature", "0", "--seed", "1"]


def ok(out) -> None:  # type: ignore[no-untyped-def]
    assert out.exception is None, f"crashed with {type(out.exception).__name__}: {out.exception}\n{out.stderr}"
    assert out.exit_code == 0, out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture
def evil_gguf(tmp_path: Path) -> Path:
    """The tiny fault-suite GGUF named EVIL, at `[/x]/[bold red]m.gguf`."""
    return small_named_gguf(evil_dir(tmp_path) / EVIL_FILE)


def test_info_prints_name_and_file_name_literally(evil_gguf: Path) -> None:
    out = invoke(["info", str(evil_gguf)])
    ok(out)
    assert f"name {EVIL}" in " ".join(out.stdout.split())
    assert f"1 ({EVIL_FILE})" in out.stdout


def test_plan_prints_name_and_path_literally(evil_gguf: Path) -> None:
    out = invoke(["plan", str(evil_gguf), "--cpu-only", "--ram", "64GiB", "--disk-read", "3GB/s"])
    ok(out)
    flat = " ".join(out.stdout.split())
    assert flat.startswith(EVIL + " F32:"), out.stdout[:300]
    assert f"-m {evil_gguf} " in out.stdout  # the llama-cli line


def test_plan_warnings_and_tips_keep_the_name(evil_gguf: Path) -> None:
    """A plan that does not fit: its warnings and tips are printed too, and nothing in them is parsed."""
    out = invoke(["plan", str(evil_gguf), "--cpu-only", "--ram", "1MiB", "--disk-read", "1GB/s"])
    ok(out)
    assert " ".join(out.stdout.split()).startswith(EVIL + " F32:")
    assert any(line.startswith("warning: ") for line in out.stderr.splitlines()), out.stderr


def test_best_quant_table_title_is_literal(evil_gguf: Path) -> None:
    out = invoke(["plan", str(evil_gguf), "--best-quant", "--cpu-only", "--ram", "64GiB", "--disk-read", "3GB/s"])
    ok(out)
    assert f"{EVIL}: every quant on this machine" in " ".join(out.stdout.split())
    assert "recommended: " in out.stdout


@pytest.mark.parametrize("command", ["info", "plan", "ask"])
def test_missing_file_under_markup_path_is_named_literally(command: str, tmp_path: Path) -> None:
    missing = evil_dir(tmp_path) / "[bold]no-such-model.gguf"
    args = [command, str(missing)] if command != "ask" else [command, "-m", str(missing), *ASK, EVIL]
    line = assert_clean_failure(invoke(args), names="no-such-model", expect=r"not found|no such", codes=(2,))
    assert str(missing) in line


def test_ui_helpers_print_text_literally(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's message and progress helpers: every string is data (progress labels carry file/tensor names)."""
    from corral.app.cli import ui

    ui.error(EVIL)
    ui.warn(EVIL)
    ui.note(EVIL)
    ui.note(("plan:", "dim"), " ", EVIL)
    with ui.count_progress(f"loading {EVIL_FILE}") as bar:
        bar(1, 2, "[/]blk.0")
    with ui.byte_progress("[/x] [red]y") as bar:
        bar(1, 2, "")
    err = capsys.readouterr().err
    assert f"error: {EVIL}\n" in err
    assert f"warning: {EVIL}\n" in err
    assert f"\n{EVIL}\n" in err
    assert f"plan: {EVIL}\n" in err
    assert f"loading {EVIL_FILE} [/]blk.0" in err
    assert "[/x] [red]y" in err


# ---------------------------------------------------------------- `ask` on a real (miniature) model


@pytest.fixture(scope="module")
def evil_models(mini_gguf_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The miniature model named EVIL under a markup path: as is, and with a template that raises EVIL."""
    folder = evil_dir(tmp_path_factory.mktemp("markup-models"))
    return {
        "named": renamed_model(mini_gguf_bf16, folder / EVIL_FILE),
        "raising": renamed_model(mini_gguf_bf16, folder / "raising.gguf", template=raising_template(EVIL)),
    }


def test_ask_with_markup_everywhere(evil_models: dict[str, Path]) -> None:
    """Markup in the prompt, the model's name and its path: the reply comes, the plan line shows them as is."""
    out = invoke(["ask", "-m", str(evil_models["named"]), *ASK, EVIL])
    ok(out)
    assert out.stdout.strip(), "no reply printed"
    plan_lines = [ln for ln in out.stderr.splitlines() if ln.startswith("plan:")]
    assert plan_lines and plan_lines[0].startswith(f"plan: {EVIL} "), out.stderr
    assert f"loading {EVIL_FILE}" in out.stderr


def test_ask_template_output_is_printed_literally(evil_models: dict[str, Path]) -> None:
    """A template that raises with markup in its message: one clean error line carrying the message as is."""
    out = invoke(["ask", "-m", str(evil_models["raising"]), *ASK, "hello"])
    line = assert_clean_failure(out, names=None, expect=r"template", after_load=True)
    assert line.endswith(EVIL), line


def test_markup_path_copy_is_still_the_same_model(evil_models: dict[str, Path], tmp_path: Path) -> None:
    """Control: the markup path and name are the only differences (the same file elsewhere answers too)."""
    plain = shutil.copy(evil_models["named"], tmp_path / "plain.gguf")
    out = invoke(["ask", "-m", str(plain), *ASK, "hello"])
    ok(out)
    assert out.stdout.strip()
