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


def _interrupt_when_temp_appears(argv: list[str], folder: Path, sig: signal.Signals, delay: float = 0.0
                                 ) -> tuple[int, str, float]:
    proc = subprocess.Popen([str(CORRAL), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 60
    while not temp_leftovers(folder):
        if proc.poll() is not None or time.monotonic() > deadline:
            _, err = proc.communicate()
            pytest.fail(f"no temp file appeared before the command ended (rc={proc.returncode}): {err.decode()}")
        time.sleep(0.005)
    time.sleep(delay)
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    time.sleep(0.2)
    alive = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, f"child processes left running after the interrupt: {alive}"
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
                                                 tmp_path, sig, delay=0.3)
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted" in err.lower()
    assert not out.exists() and not temp_leftovers(tmp_path)
    assert took < 15
