"""Real signals to a real `corral ask` process: Ctrl-C and SIGTERM stop between tokens, keep the text, exit 130."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers.engine import shared_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_gguf(tmp_path_factory)


def _ask(model: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "corral.app.cli.main", "ask", "-m", str(model), "Tell me everything.",
           "--temperature", "0", "--max-tokens", "0", "--ctx", "8192", "--threads", "1", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _read_some(proc: subprocess.Popen[bytes], n: int, timeout: float) -> bytes:
    """Read at least n bytes of stdout (the reply has started streaming)."""
    assert proc.stdout is not None
    got = b""
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            got += chunk
    return got


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_reply_exits_130_with_partial_text(tiny: Path, sig: signal.Signals) -> None:
    proc = _ask(tiny)
    try:
        head = _read_some(proc, 40, timeout=90)
        assert len(head) >= 40, "the reply never started streaming"
        sent = time.monotonic()
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=30)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode(errors="replace")
    assert stopped_after < 5.0  # between tokens, not after 8192 of them
    assert b"interrupted" in err and b"Traceback" not in err
    assert (head + rest).strip()  # what was generated is kept
