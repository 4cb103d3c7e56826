"""RPC workers over loopback: `corral worker`, probing, placing layers on workers, and losing a worker.

Everything that registers a worker's devices runs in a subprocess (`corral ask`, tests.helpers.rpc_client):
ggml's device registry is process-wide, and a model loaded later in this process would try to reach them.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.app.runtime import rpc
from corral.convert.errors import EXIT_RUNTIME, UsageError
from corral.convert.units import GiB
from tests.helpers.engine import shared_tiny_gguf, write_tiny_gguf
from tests.helpers.rpc import REPO, corral_command, free_port, rpc_workers

needs_rpc = pytest.mark.skipif(not rpc.available(), reason="llama-cpp-python was built without GGML_RPC=on "
                               "(`make venv` builds it with RPC)")
PROMPT = "Tell me about llamas."


def _client(*args: str, timeout: float = 180) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.helpers.rpc_client", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- reaching a worker (no llama.cpp needed) ---------------------------------------------------------
def test_unreachable_endpoint_is_a_one_line_usage_error() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(UsageError) as caught:
        rpc.check_reachable(endpoint, timeout=2.0)
    message = str(caught.value)
    assert message.startswith(f"cannot reach RPC worker {endpoint}: ") and "\n" not in message
    assert "refused" in message.lower()


def test_malformed_endpoint_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="HOST:PORT"):
        rpc.check_reachable("no-port-here")


def test_a_silent_peer_times_out_with_a_clear_message() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # accepts the connection in the kernel, never answers HELLO
        endpoint = f"127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(UsageError, match="did not answer within 1 s"):
            rpc.check_reachable(endpoint, timeout=1.0)
        assert time.monotonic() - start < 5


@needs_rpc
def test_unreachable_worker_fails_before_llama_cpp_sees_it() -> None:
    """add_server checks first: ggml-rpc itself would abort the process on a refused connection."""
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(UsageError, match="cannot reach RPC worker"):
        rpc.add_server(endpoint)
    assert endpoint not in rpc.registered()


# -- corral worker -----------------------------------------------------------------------------------
@needs_rpc
def test_worker_warns_exposes_its_device_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    with rpc_workers(1, tmp_path) as (worker,):
        time.sleep(0.5)
        assert worker.interrupt() == 0
        out = worker.output()
    assert "no authentication" in out and "trusted network" in out
    assert f"clients add it with --rpc {worker.endpoint}" in out
    assert "CPU" in out  # the device it exposes (no GPU here)
    assert "worker stopped" in out
    with pytest.raises(UsageError):
        rpc.check_reachable(worker.endpoint, timeout=1.0)


@needs_rpc
def test_worker_serves_one_client_at_a_time(tmp_path: Path) -> None:
    with rpc_workers(1, tmp_path) as (worker,):
        host, port = worker.endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as holder:
            holder.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
            assert holder.recv(8)  # HELLO answered: this connection now holds the worker
            with pytest.raises(UsageError, match="busy with another client"):
                rpc.check_reachable(worker.endpoint, timeout=1.0)
        rpc.check_reachable(worker.endpoint, timeout=5.0)  # free again once that client leaves


@needs_rpc
def test_worker_rejects_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(corral_command("worker", "--port", str(port), "--no-cache"), capture_output=True,
                              text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


# -- probing -----------------------------------------------------------------------------------------
@needs_rpc
def test_probe_reports_the_worker_device_capped_memory_and_link(tmp_path: Path) -> None:
    with rpc_workers(1, tmp_path, extra=("--mem", "1GiB")) as (worker,):
        found = _client("probe", worker.endpoint)
    assert found["endpoint"] == worker.endpoint
    (device,) = found["devices"]
    assert device["name"].startswith("RPC") and device["endpoint"] == worker.endpoint and device["index"] == 0
    assert device["description"] == worker.endpoint
    assert device["total"] == 1 * GiB and 0 < device["free"] <= 1 * GiB  # --mem caps what it reports
    link = found["link"]
    assert 0 < link["latency_s"] < 0.5
    assert link["bandwidth"] > 20e6  # loopback moves far more than 20 MB/s, even on a loaded machine


@needs_rpc
def test_probe_without_a_cap_reports_the_machine(tmp_path: Path) -> None:
    import psutil

    with rpc_workers(1, tmp_path) as (worker,):
        found = _client("probe", worker.endpoint, "--no-link")
    (device,) = found["devices"]
    assert abs(device["total"] - psutil.virtual_memory().total) < 0.05 * psutil.virtual_memory().total
    assert found["link"]["latency_s"] == 0.0


# -- running on workers ------------------------------------------------------------------------------
@needs_rpc
def test_two_workers_give_the_local_greedy_output(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model = str(shared_tiny_gguf(tmp_path_factory))
    local = _client("generate", model, PROMPT, "--max-tokens", "24")
    with rpc_workers(2, tmp_path) as workers:
        remote = _client("generate", model, PROMPT, "--max-tokens", "24", *(a for w in workers
                                                                             for a in ("--rpc", w.endpoint)))
        served = [w.output() for w in workers]
    assert local["tokens"] == remote["tokens"] == 24
    assert remote["text"] == local["text"]
    assert len(remote["devices"]) == 2
    assert all(name.startswith("RPC") for name in remote["devices"])
    for worker in workers:  # each worker holds a share of the weights (buffers are named RPC<i>[endpoint])
        assert any(f"[{worker.endpoint}] model buffer size" in line for line in remote["buffers"]), remote["buffers"]
    assert all("Accepted client connection" in out for out in served)


def _long_model(tmp_path: Path) -> Path:
    """A model whose greedy reply never ends early (it runs to --max-tokens)."""
    return write_tiny_gguf(tmp_path / "long.gguf", seed=3)


@needs_rpc
def test_a_worker_killed_mid_reply_gives_one_line_and_keeps_the_text(tmp_path: Path) -> None:
    model = _long_model(tmp_path)
    with rpc_workers(2, tmp_path) as workers:
        args = ["ask", "-m", str(model), "--temperature", "0", "--max-tokens", "900", "--ctx", "1024",
                "--threads", "1", *(a for w in workers for a in ("--rpc", w.endpoint)), PROMPT]
        process = subprocess.Popen(corral_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert process.stdout is not None
        first = process.stdout.read(40)  # the reply is streaming
        assert first, process.stderr.read().decode() if process.stderr else ""
        workers[1].kill()
        killed_at = time.monotonic()
        try:
            rest, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("corral ask hung after its worker died")
    elapsed = time.monotonic() - killed_at
    stderr = err.decode()
    assert process.returncode == EXIT_RUNTIME, stderr
    assert elapsed < 15
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: lost RPC worker {workers[1].endpoint} mid-run"), stderr
    assert "Traceback" not in stderr and "GGML_ASSERT" not in stderr
    text = (first + rest).decode(errors="replace")
    assert len(text.strip()) >= 20 and text.endswith("\n")  # the partial reply stays, its line ended


def test_watchdog_ends_a_decode_that_stops_progressing(tmp_path: Path) -> None:
    """A worker that hangs (stopped, socket open): no error from the socket, the watchdog fires."""
    script = (
        "import threading, time\n"
        "from corral.app.runtime import rpc\n"
        "lock = threading.Lock(); lock.acquire()\n"
        "rpc.Watchdog(lock.locked, lambda: 0, timeout=1.0, poll=0.1).start()\n"
        "time.sleep(30)\n"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == EXIT_RUNTIME
    assert time.monotonic() - start < 15
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no progress for 1 s" in done.stderr


def test_chat_saves_the_partial_reply_when_a_worker_is_lost(tmp_path: Path) -> None:
    """The hook `corral chat` registers: the reply so far (shown and still buffered) saved as a stopped reply."""
    from types import SimpleNamespace

    from corral.app.chats.store import ChatStore
    from corral.app.cli.cmd_chat import _keep_reply_on_worker_loss
    from corral.tui.message_view import PieceBuffer

    store = ChatStore(tmp_path / "chats.db")
    try:
        conversation = store.new_conversation(model="tiny")
        store.add_message(conversation, "user", "hello")
        buffer = PieceBuffer()
        buffer.append(" and more")
        job = SimpleNamespace(save_failed=False, box=SimpleNamespace(content="Llamas are"), buffer=buffer,
                              message_id=None, conversation_id=conversation)
        app = SimpleNamespace(chat_screen=SimpleNamespace(job=job))
        _keep_reply_on_worker_loss(app, store)("lost RPC worker 127.0.0.1:1 mid-run")
        reply = store.get(conversation).messages[-1]
        assert (reply.role, reply.content, reply.status) == ("assistant", "Llamas are and more", "cancelled")
    finally:
        store.close()


def test_keep_alive_sets_keepalive_on_this_process_connections_to_the_worker() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            assert rpc.keep_alive(f"127.0.0.1:{port}", idle_s=7, unacked_s=30) == 1
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30000


@needs_rpc
def test_ask_with_an_unreachable_worker_is_one_line_and_exit_2(tmp_path_factory: pytest.TempPathFactory) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    model = str(shared_tiny_gguf(tmp_path_factory))
    done = subprocess.run(corral_command("ask", "-m", model, "--rpc", endpoint, "--max-tokens", "4", "hi"),
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: cannot reach RPC worker {endpoint}: Connection refused"], done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("[::1]", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                                ("worker.lan", False)])
def test_which_hosts_count_as_loopback_for_the_worker_warning(host: str, loopback: bool) -> None:
    from corral.app.cli.cmd_worker import _is_loopback

    assert _is_loopback(host) is loopback
