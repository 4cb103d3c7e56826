"""Fixtures and checks shared by the fault suite: the corpus on disk (built once) and the 'clean failure' rule."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from corral.app.cli.main import cli

from .corpus_gguf import gguf_cases, small_gguf

CORRAL = Path(sys.executable).with_name("corral")
_PROGRESS = re.compile(r"[━╸╺]")
_MARKUP = re.compile(r"\x1b\[[0-9;]*m")


def strip_markup(text: str) -> str:
    """Text without ANSI colour codes."""
    return _MARKUP.sub("", text)


@dataclass(frozen=True)
class Outcome:
    """What one CLI run did: exit code, stdout, stderr, and any exception other than SystemExit."""

    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None


def invoke(args: list[str], *, input: str | None = None) -> Outcome:
    """Run `corral ARGS` in-process (click's CliRunner); stderr kept apart from stdout."""
    result: Result = CliRunner().invoke(cli, args, input=input, catch_exceptions=True)
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return Outcome(result.exit_code, result.stdout, strip_markup(result.stderr), exc)


def invoke_convert(src: Path, out: Path, *extra: str) -> Outcome:
    """`corral convert SRC -o OUT -q EXTRA...` in-process."""
    return invoke(["convert", str(src), "-o", str(out), "-q", *extra])


def run_corral(args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None,
               input: bytes | None = None, tty: bool = False) -> Outcome:
    """Run the real `corral` executable in a subprocess (stdin/stdout on a pseudo-terminal with `tty`)."""
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200", "NO_COLOR": "1"}
    if not tty:
        proc = subprocess.run([str(CORRAL), *args], capture_output=True, timeout=timeout, input=input, env=full_env)
        return Outcome(proc.returncode, proc.stdout.decode(errors="replace"),
                       strip_markup(proc.stderr.decode(errors="replace")))
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([str(CORRAL), *args], stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=full_env)
        os.close(slave)
        _, err = proc.communicate(timeout=timeout)
        screen = b""
        os.set_blocking(master, False)
        try:
            screen = os.read(master, 1 << 20)
        except OSError:
            pass
    finally:
        os.close(master)
    return Outcome(proc.returncode, screen.decode(errors="replace"), strip_markup(err.decode(errors="replace")))


def assert_clean_failure(out: Outcome, *, names: Path | str | None, expect: str | None = None,
                         codes: tuple[int, ...] = (1, 2), after_load: bool = False) -> str:
    """Exit non-zero, no crash, exactly ONE line on stderr ('error: ...') naming the file and the problem.

    `after_load`: the failure comes once the model is loading, so the plan note and warnings printed
    before it are allowed (still exactly one error line, and no traceback).
    """
    assert out.exception is None, f"crashed with {type(out.exception).__name__}: {out.exception}\n{out.stderr}"
    assert out.exit_code in codes, f"exit {out.exit_code} (want {codes}); stderr: {out.stderr!r}"
    # progress bars (drawn on stderr while work runs) are not messages: skip them
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not _PROGRESS.search(ln)]
    if after_load:
        lines = [ln for ln in lines if not ln.startswith(("plan:", "warning:", "loading "))]
    assert len(lines) == 1, f"want one line on stderr, got {len(lines)}:\n{out.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in out.stderr
    assert len(line) < 400, f"error line too long ({len(line)} chars)"
    if names is not None:
        name = names.name if isinstance(names, Path) else names
        assert name in line, f"{name!r} not named in {line!r}"
    if expect is not None:
        shown = line if names is None else line.replace(str(names), "<FILE>")
        assert re.search(expect, shown, re.IGNORECASE), f"{expect!r} not in {line!r}"
    return line


def fingerprint(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file below `folder` (to prove inputs untouched and nothing extra written)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.stat().st_size < 1 << 26 \
                else f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
    return out


def temp_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if "corral-tmp" in p.name]


def command_args(name: str, model: Path, out: Path | None = None) -> list[str]:
    """argv for running command `name` on `model` (adapts to positional vs -m/--model)."""
    cmd = cli.commands[name]
    positional = [p for p in cmd.params if isinstance(p, click.Argument)]
    opts = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
    argv = [name]
    if name == "quantize":
        return [name, str(model), str(out), "--type", "Q8_0"]
    if positional and positional[0].name in ("model", "src", "path", "gguf", "source", "input"):
        argv.append(str(model))
    elif "-m" in opts:
        argv += ["-m", str(model)]
    else:
        argv.append(str(model))
    if name == "ask":
        argv += ["--ctx", "256", "--max-tokens", "2", "--temperature", "0", "hello"]
    return argv


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every malformed GGUF of the corpus, written once: <case>.gguf (plus good.gguf)."""
    folder = tmp_path_factory.mktemp("gguf-corpus")
    (folder / "good.gguf").write_bytes(small_gguf().data)
    for case in gguf_cases():
        (folder / f"{case.name}.gguf").write_bytes(case.data)
    return folder


@pytest.fixture
def fake_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `corral chat` believe it runs in a terminal (its TUI must then never start on a bad model)."""
    import types

    import corral.app.cli.cmd_chat as cmd_chat

    tty = types.SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr(cmd_chat, "sys", types.SimpleNamespace(stdin=tty, stdout=tty))

    def no_tui(*args: object, **kwargs: object) -> None:
        raise AssertionError("the chat UI started on an invalid model")

    monkeypatch.setattr(cmd_chat, "_run_app", no_tui)
