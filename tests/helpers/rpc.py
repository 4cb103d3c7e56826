"""`corral worker` subprocesses on free loopback ports, for tests that place layers on RPC workers.

Registering a worker's devices is process-wide in ggml (and a later load would try to reach them), so tests
talk to workers only from subprocesses: `corral ask` itself, or `python -m tests.helpers.rpc_client`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def corral_command(*args: str) -> list[str]:
    """The `corral` command line through this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "corral.app.cli.main", *args]


@dataclass
class Worker:
    endpoint: str
    process: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def interrupt(self, timeout: float = 20.0) -> int:
        """Ctrl-C; the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout)


def wait_ready(endpoint: str, process: subprocess.Popen[str], log: Path, timeout: float = 60.0) -> None:
    """Until the worker answers the protocol's HELLO (or fails: its output in the error)."""
    from corral.app.runtime.rpc import check_reachable
    from corral.convert.errors import UsageError

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"worker {endpoint} exited with {process.returncode}:\n{log.read_text()}")
        try:
            check_reachable(endpoint, timeout=2.0)
            return
        except UsageError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {endpoint} not ready after {timeout} s:\n{log.read_text()}") from None
            time.sleep(0.2)


@contextmanager
def rpc_workers(n: int, tmp: Path, *, threads: int = 1, extra: Sequence[str] = (),
                env: dict[str, str] | None = None) -> Iterator[list[Worker]]:
    """`n` workers (`corral worker --port P --threads T --no-cache`, plus `extra` flags) that accept
    connections; killed on exit."""
    workers: list[Worker] = []
    try:
        for i in range(n):
            port = free_port()
            log = tmp / f"worker-{i}-{port}.log"
            flags = ["--port", str(port), "--threads", str(threads)]
            if "--cache" not in extra:
                flags.append("--no-cache")
            with log.open("w") as sink:
                process = subprocess.Popen(corral_command("worker", *flags, *extra), stdout=sink,
                                           stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                           env={**os.environ, **(env or {})})
            workers.append(Worker(f"127.0.0.1:{port}", process, log))
        for worker in workers:
            wait_ready(worker.endpoint, worker.process, worker.log)
        yield workers
    finally:
        for worker in workers:
            worker.kill()
