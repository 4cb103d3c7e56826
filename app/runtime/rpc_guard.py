"""When an RPC worker fails mid-run: one line and exit code 1 instead of an abort, or a hang.

ggml-rpc's client aborts the process (GGML_ABORT) when a worker's socket dies. `install_abort_hook` routes
that abort through `fatal`, which runs the hooks the CLI registered (`on_fatal`: end the printed line, save a
partial chat reply, give the terminal back), names the worker that is gone and leaves with EXIT_RUNTIME.
`keep_alive` makes a worker whose machine vanishes without closing the connection fail the socket, and
`Watchdog` ends a decode that makes no progress for a long time (a worker that hangs with its socket open).
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from corral.convert.errors import EXIT_RUNTIME
from corral.offload.rpc import parse_endpoint

WATCHDOG_TIMEOUT_S = float(os.environ.get("CORRAL_RPC_TIMEOUT", "180"))

_endpoints: list[str] = []  # the workers this process registered, for naming the one that is gone


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """(host without brackets, port) of a normalised `HOST:PORT`."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def track(endpoint: str) -> None:
    """Remember a registered worker (the failure message names the first one that no longer listens)."""
    if endpoint not in _endpoints:
        _endpoints.append(endpoint)

_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_fatal_hooks: list[Callable[[str], None]] = []
_abort_ref: Any = None
_fatal_lock = threading.Lock()


def _describe(reason: str) -> str:
    """One line: which worker is gone (the first registered one that no longer answers), and the reason."""
    reason = reason.strip().splitlines()[0] if reason.strip() else "the connection failed"
    for _ in range(10):  # a dying worker may close our connection an instant before its listening socket
        for endpoint in _endpoints:
            if not _listening(endpoint):
                return f"lost RPC worker {endpoint} mid-run ({reason})"
        time.sleep(0.1)
    return f"an RPC worker failed mid-run ({reason})"


def _listening(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at `endpoint` (a live worker busy with this process does,
    although it would not answer a HELLO)."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def fatal(reason: str) -> None:
    """Run the hooks (they keep what the product saves: printed text, a partial reply), print one line on
    stderr and leave with exit code 1. Called from any thread, once."""
    if not _fatal_lock.acquire(blocking=False):
        return
    message = _describe(reason)
    for hook in list(_fatal_hooks):
        try:
            hook(message)
        except BaseException:  # noqa: BLE001 - the exit below must happen
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(2, f"error: {message}\n".encode())  # fd 2 itself: a terminal UI may have replaced sys.stderr
    finally:
        os._exit(EXIT_RUNTIME)


def _on_abort(message: bytes | None) -> None:
    text = (message or b"").decode("utf-8", errors="replace")
    fatal(text.split(": ", 1)[-1])  # ggml's message starts "file:line: "


def install_abort_hook() -> None:
    """Route ggml's aborts (a dead worker socket aborts inside ggml-rpc) through `fatal`."""
    global _abort_ref
    if _abort_ref is None:
        from corral.app.runtime.native import lc

        setter = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(("ggml_set_abort_callback", lc._lib))
        _abort_ref = _ABORT_CALLBACK(_on_abort)
        setter(ctypes.cast(_abort_ref, ctypes.c_void_p))


@contextmanager
def on_fatal(hook: Callable[[str], None]) -> Iterator[None]:
    """While inside, `hook(message)` runs before the process leaves on a worker failure (keep it short)."""
    _fatal_hooks.append(hook)
    try:
        yield
    finally:
        _fatal_hooks.remove(hook)


def connections_to(endpoint: str) -> list[int]:
    """File descriptors of this process's TCP connections to `endpoint` (ggml-rpc's, once it connected)."""
    import psutil

    host, port = split_endpoint(endpoint)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return []
    return [conn.fd for conn in psutil.Process().net_connections(kind="tcp")
            if conn.fd >= 0 and conn.raddr and conn.raddr.port == port and conn.raddr.ip in addresses]


def keep_alive(endpoint: str, *, idle_s: int = 5, interval_s: int = 2, count: int = 3, unacked_s: int = 30) -> int:
    """TCP keepalive on this process's sockets to `endpoint`, so a worker whose machine vanishes without
    closing the connection errors out instead of leaving a read waiting for ever: probes after `idle_s`, and
    the connection dropped once probes or sent data go unacknowledged for `unacked_s` (TCP_USER_TIMEOUT, which
    on Linux governs both; a worker that is merely busy still acknowledges). The number of sockets set."""
    done = 0
    for fd in connections_to(endpoint):
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s), ("TCP_KEEPCNT", count),
                                ("TCP_USER_TIMEOUT", unacked_s * 1000)):
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        done += 1
    return done


class Watchdog:
    """Ends the process when a generation makes no decode progress for `timeout` seconds (a worker that hangs
    without its socket failing). `busy()` says whether a decode is under way, `progress()` returns a value that
    changes with every decoded token or prompt chunk."""

    def __init__(self, busy: Callable[[], bool], progress: Callable[[], object], *,
                 timeout: float = WATCHDOG_TIMEOUT_S, poll: float = 1.0) -> None:
        self.busy, self.progress, self.timeout, self.poll = busy, progress, timeout, poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corral-rpc-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last, since = None, time.monotonic()
        while not self._stop.wait(self.poll):
            now, seen = time.monotonic(), (self.busy(), self.progress())
            if not seen[0] or seen != last:
                last, since = seen, now
                continue
            if now - since > self.timeout:
                fatal(f"no progress for {self.timeout:g} s; a worker stopped answering")
                return


def watch_engine(engine: Any, *, timeout: float = WATCHDOG_TIMEOUT_S) -> Watchdog | None:
    """For a LlamaEngine loaded with RPC workers (None without them): keepalive on its connections to them
    (open for as long as the model holds buffers there) and a started Watchdog over its decodes."""
    settings = getattr(engine, "settings", None)
    if not getattr(settings, "rpc_servers", ()):
        return None
    for endpoint in settings.rpc_servers:
        keep_alive(parse_endpoint(endpoint))
    lock = engine._lock

    def progress() -> object:
        cached = engine._cached
        return id(cached), len(cached), len(engine.last_completion_tokens)

    return Watchdog(lock.locked, progress, timeout=timeout).start()


__all__ = ["WATCHDOG_TIMEOUT_S", "Watchdog", "connections_to", "fatal", "install_abort_hook", "keep_alive", "on_fatal",
           "split_endpoint", "track", "watch_engine"]
