"""`corral worker`: Lend this machine's devices to another corral over llama.cpp's RPC protocol."""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from corral.app.cli import ui
from corral.convert.errors import EXIT_RUNTIME, CorralError
from corral.convert.units import format_bytes, parse_size

WARNING = ("the RPC protocol has no authentication and no encryption: anyone who can reach this port can run "
           "code on its devices and read what they hold. Expose it only on a trusted network.")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_mem(value: str | None) -> int | None:
    if value is None:
        return None
    size = parse_size(value)
    if size <= 0:
        raise click.BadParameter("must be a positive size such as 24GiB", param_hint="--mem")
    return size


@click.command("worker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the worker to your network.")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True, help="TCP port.")
@click.option("--device", "devices", multiple=True, metavar="NAME",
              help="A ggml device to expose, e.g. CUDA0 (repeatable; a wrong name lists the devices there are). "
                   "Default: every GPU, else the CPU.")
@click.option("--mem", default=None, metavar="SIZE",
              help="Report at most SIZE of memory per device to clients (e.g. 48GiB), so their plans leave "
                   "the rest of this machine alone. llama.cpp does not enforce it: it only shapes plans.")
@click.option("--cache", "cache", default=None, metavar="DIR",
              help="Keep large weights the client sends in DIR, so loading the same model again is fast "
                   "(default: the worker cache under corral's cache directory).")
@click.option("--no-cache", is_flag=True, help="Keep no tensor cache.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
def worker(host: str, port: int, devices: tuple[str, ...], mem: str | None, cache: str | None, no_cache: bool,
           threads: int | None) -> None:
    """Lend this machine's devices to another corral over llama.cpp's RPC protocol.

    A client adds this worker with `--rpc HOST:PORT` (corral plan, ask, chat) and llama.cpp places
    layers on its devices. One client at a time. Binds 127.0.0.1 unless --host says otherwise; the
    protocol has no authentication, so expose it only on a trusted network. Ctrl-C stops it.
    """
    from corral.app.locations import cache_dir
    from corral.app.runtime import rpc, rpc_serve
    from corral.offload.rpc import parse_endpoint

    shown_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    endpoint = parse_endpoint(f"{shown_host}:{port}")
    limit = _parse_mem(mem)
    rpc.require()
    rows = rpc_serve.local_devices(devices)
    rpc_serve.check_can_listen(endpoint)
    directory = None if no_cache else (cache or str(cache_dir() / "rpc"))
    n_threads = threads or os.cpu_count() or 1

    ui.warn(WARNING)
    if not _is_loopback(host):
        ui.warn(f"listening on {host}, not loopback: every machine that can reach port {port} can use this "
                "worker. Firewall the port to the client's address.")
    ui.note(("worker", "bold"), f" {endpoint}  ({n_threads} threads, cache: {directory or 'off'})")
    for _, name, description, free, total in rows:
        lent = f", reports {format_bytes(min(total, limit))}" if limit is not None else ""
        ui.note(f"  {name}: {description} ({format_bytes(total)}, {format_bytes(free)} free{lent})")
    ui.note(f"clients add it with --rpc {endpoint} - Ctrl-C stops it", style="dim")

    failure: list[BaseException] = []

    def run() -> None:
        try:
            rpc_serve.serve(endpoint, directory, n_threads, devices, mem=limit)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)

    stop = threading.Event()
    signals = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = threading.Thread(target=run, name="corral-rpc-server", daemon=True)
    server.start()
    while not stop.wait(0.2) and server.is_alive():
        pass
    for sig, previous in signals.items():
        signal.signal(sig, previous)
    sys.stdout.flush()
    if stop.is_set():
        ui.note("worker stopped")
        sys.stderr.flush()
        os._exit(0)  # the C server blocks in accept() and has no stop call
    error = failure[0] if failure else None
    ui.error(str(error) if isinstance(error, CorralError) else f"the RPC server stopped: {error!r}")
    sys.stderr.flush()
    os._exit(EXIT_RUNTIME)


__all__ = ["WARNING", "worker"]
