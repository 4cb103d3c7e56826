"""Real signals to a real `corral ask` process: Ctrl-C and SIGTERM stop between tokens, keep the text, exit 130."""

from __future__ import annotations

import os
import re
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
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")  # one stats line, never wrapped
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
    proc = _ask(tiny, "--verbose")  # --verbose: the stats line says how many tokens were generated
    try:
        head = _read_some(proc, 40, timeout=90)
        assert len(head) >= 40, "the reply never started streaming"
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=60)  # a hang guard; how fast it stops: bench/bench_latency.py
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode(errors="replace")
    assert b"interrupted" in err and b"Traceback" not in err
    stats = re.search(rb"(\d+) generated at [0-9.]+ tok/s \(cancelled\)", err)
    assert stats, err.decode(errors="replace")[-2000:]
    assert int(stats.group(1)) < 4096  # stopped between tokens, not after the 8192-token context filled
    assert (head + rest).strip()  # what was generated is kept
