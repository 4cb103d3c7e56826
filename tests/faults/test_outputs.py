"""Writing outputs: existing files kept, disk full (before or during), Ctrl-C / SIGTERM: nothing half-written."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from .conftest import (
    CORRAL,
    Outcome,
    assert_clean_failure,
    fingerprint,
    invoke,
    invoke_convert,
    temp_leftovers,
)

PRECIOUS = b"precious data that must survive\n"


def _quantize(src: Path, out: Path, *extra: str) -> Outcome:
    return invoke(["quantize", str(src), str(out), "--type", "Q8_0", *extra])


# ------------------------------------------------------------------------------ output exists


def _refuses_existing_output(command: Callable[[Path, Path], Outcome], src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(PRECIOUS)
    result = command(src, out)
    assert_clean_failure(result, names=out, expect=r"exists.*--force", codes=(2,))
    assert out.read_bytes() == PRECIOUS and not temp_leftovers(tmp_path)


def test_convert_refuses_existing_output(mini_checkpoint: Path, tmp_path: Path) -> None:
    _refuses_existing_output(invoke_convert, mini_checkpoint, tmp_path)


def test_quantize_refuses_existing_output(mini_gguf_bf16: Path, tmp_path: Path) -> None:
    _refuses_existing_output(_quantize, mini_gguf_bf16, tmp_path)


def test_quantize_refuses_to_overwrite_its_input(mini_gguf_bf16: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.gguf"
    os.link(mini_gguf_bf16, src)
    before = src.stat().st_mtime_ns
    result = _quantize(src, src, "--force")
    assert_clean_failure(result, names=src, expect=r"input", codes=(2,))
    assert src.stat().st_mtime_ns == before and not temp_leftovers(tmp_path)


# ------------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_convert_checks_free_space_first(mini_checkpoint: Path, small_disk: Path) -> None:
    out = small_disk / "out.gguf"
    result = invoke_convert(mini_checkpoint, out)
    assert_clean_failure(result, names=small_disk.name, expect=r"disk space", codes=(1,))
    assert list(small_disk.iterdir()) == []


def test_quantize_checks_free_space_first(mini_gguf_bf16: Path, small_disk: Path) -> None:
    result = _quantize(mini_gguf_bf16, small_disk / "out.gguf")
    assert_clean_failure(result, names=small_disk.name, expect=r"disk space", codes=(1,))
    assert list(small_disk.iterdir()) == []


def test_free_space_precheck_without_mount(mini_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    """The same pre-check where no tmpfs can be mounted: the filesystem reports 1 MiB free."""
    import shutil

    import corral.convert.atomic as atomic

    real = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    out = tmp_path / "out.gguf"
    result = invoke_convert(mini_checkpoint, out)
    assert_clean_failure(result, expect=r"disk space", names=None, codes=(1,))
    assert not out.exists() and not temp_leftovers(tmp_path)


def test_convert_enospc_mid_write_real(mini_checkpoint: Path, small_disk: Path, monkeypatch) -> None:
    """The pre-check is fooled, so the disk really fills up half-way: the temp file must go."""
    import corral.convert.gguf_writer as gw

    monkeypatch.setattr(gw, "check_free_space", lambda folder, needed: None)
    out = small_disk / "out.gguf"
    result = invoke_convert(mini_checkpoint, out)
    assert list(small_disk.iterdir()) == []  # cleanup first: it works even where the message falls short
    assert_clean_failure(result, names=out, expect=r"no space left", codes=(1,))


def test_convert_enospc_mid_write_simulated(mini_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    """ENOSPC raised by the writer's own file write after a few chunks (no mount needed)."""
    import corral.convert.gguf_writer as gw

    real = gw._write_all
    calls = {"n": 0}

    def failing(fh, data):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fh, data)

    monkeypatch.setattr(gw, "_write_all", failing)
    out = tmp_path / "out.gguf"
    result = invoke_convert(mini_checkpoint, out)
    assert calls["n"] > 4, "the writer did not write through _write_all"
    assert not out.exists() and not temp_leftovers(tmp_path)
    assert_clean_failure(result, names=out, expect=r"no space left", codes=(1,))


def test_quantize_enospc_mid_write_real(mini_gguf_bf16: Path, small_disk: Path, monkeypatch) -> None:
    import corral.convert.quantize as q

    monkeypatch.setattr(q, "check_free_space", lambda folder, needed: None)
    out = small_disk / "out.gguf"
    result = _quantize(mini_gguf_bf16, out)
    assert list(small_disk.iterdir()) == []
    assert_clean_failure(result, names=out, expect=r"space|disk full", codes=(1,))


# ----------------------------------------------------------------------- Ctrl-C and SIGTERM


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _interrupt_when_temp_appears(argv: list[str], folder: Path, sig: signal.Signals, *, with_child: bool = False
                                 ) -> tuple[int, str, float]:
    """Send `sig` once the output's temp file exists (with `with_child`: once the worker child that writes it
    runs too); return (exit code, stderr, seconds from the signal to the exit). The deadlines are hang guards."""
    proc = subprocess.Popen([str(CORRAL), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 60
    children: list[int] = []
    while not temp_leftovers(folder) or (with_child and not children):
        if proc.poll() is not None or time.monotonic() > deadline:
            _, err = proc.communicate()
            pytest.fail(f"no temp file appeared before the command ended (rc={proc.returncode}): {err.decode()}")
        time.sleep(0.005)
        if with_child:
            children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert children or not with_child
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    gone_by = time.monotonic() + 30
    while _alive(children) and time.monotonic() < gone_by:
        time.sleep(0.01)
    assert not _alive(children), f"child processes left running after the interrupt: {_alive(children)}"
    return proc.returncode, err.decode(errors="replace"), took


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_convert_interrupted(sig: signal.Signals, mini_checkpoint: Path, tmp_path: Path) -> None:
    before = fingerprint(mini_checkpoint)
    out = tmp_path / "out.gguf"
    rc, err, took = _interrupt_when_temp_appears(["convert", str(mini_checkpoint), "-o", str(out), "--outtype", "f32"],
                                                 tmp_path, sig)
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted" in err.lower()
    assert not out.exists() and not temp_leftovers(tmp_path)
    assert took < 10
    assert fingerprint(mini_checkpoint) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_quantize_interrupted(sig: signal.Signals, mini_gguf_f32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    rc, err, took = _interrupt_when_temp_appears(["quantize", str(mini_gguf_f32), str(out), "--type", "Q4_K_M"],
                                                 tmp_path, sig, with_child=True)
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted" in err.lower()
    assert not out.exists() and not temp_leftovers(tmp_path)
    assert took < 15
