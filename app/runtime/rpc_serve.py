"""The worker side of ggml-rpc (`corral worker`): which local devices to expose, a memory cap, the server."""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corral.app.runtime.rpc import device_handle, ggml_api, require
from corral.app.runtime.rpc_guard import split_endpoint
from corral.convert.errors import EngineError, UsageError
from corral.offload.rpc import parse_endpoint


def local_devices(names: Sequence[str] = ()) -> list[tuple[int, str, str, int, int]]:
    """(handle, name, description, free, total) of the devices a worker would expose: those named, else every
    GPU (accelerators and the CPU are not GPUs), else the CPU, as llama.cpp's rpc-server picks."""
    from corral.app.runtime.native import init_backend

    init_backend()
    api = ggml_api()
    handles: list[int] = []
    if names:
        handles = [device_handle(name) for name in names]
    else:
        all_devs = [api.dev_get(i) for i in range(api.dev_count())]
        handles = [d for d in all_devs if api.dev_type(d) not in (0, 3)
                   and not (api.dev_name(d) or b"").startswith(b"RPC")]
        if not handles:
            handles = [d for d in all_devs if api.dev_type(d) == 0][:1]
    rows = []
    for dev in handles:
        free, total = api.memory(dev)
        rows.append((dev, (api.dev_name(dev) or b"?").decode(), (api.dev_description(dev) or b"").decode(),
                     free, total))
    return rows


_MEMORY_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t))
_GET_MEMORY_SLOT = 2  # ggml-backend-impl.h: ggml_backend_device_i starts get_name, get_description, get_memory
_caps: list[Any] = []


def cap_memory(handle: int, limit: int) -> None:
    """Make this process's device `handle` report at most `limit` bytes (total and free), so a worker
    advertises what it lends rather than the whole device. The protocol has no field for a cap: this swaps
    the device's get_memory entry (a table of function pointers at the start of ggml's device struct) for
    one that calls the original and clamps. Only for a worker process; what llama.cpp itself allocates is
    not limited."""
    slot = ctypes.c_void_p.from_address(handle + _GET_MEMORY_SLOT * ctypes.sizeof(ctypes.c_void_p))
    original = _MEMORY_FN(slot.value)

    def clamped(dev: int, free: Any, total: Any) -> None:
        original(dev, free, total)
        total[0] = min(int(total[0]), limit)
        free[0] = min(int(free[0]), limit)

    callback = _MEMORY_FN(clamped)
    _caps.append((original, callback))
    slot.value = ctypes.cast(callback, ctypes.c_void_p).value


def check_can_listen(endpoint: str) -> None:
    """A UsageError with one line when `endpoint` cannot be bound (in use, not this machine's address)."""
    host, port = split_endpoint(parse_endpoint(endpoint))
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe_sock:
            probe_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe_sock.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None


def serve(endpoint: str, cache_dir: str | Path | None, n_threads: int, devices: Sequence[str] = (), *,
          mem: int | None = None) -> None:
    """Run a worker on `endpoint` exposing `devices`, each reporting at most `mem` bytes (blocks for good;
    ggml-rpc has no stop call)."""
    lib = require()
    endpoint = parse_endpoint(endpoint)
    handles = [row[0] for row in local_devices(devices)]
    if not handles:
        raise UsageError("no device to expose")
    if mem is not None:
        for handle in handles:
            cap_memory(handle, mem)
    check_can_listen(endpoint)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    array = (ctypes.c_void_p * len(handles))(*handles)
    cache = str(cache_dir).encode() if cache_dir is not None else None
    lib.ggml_backend_rpc_start_server(endpoint.encode(), cache, max(1, n_threads), len(handles), array)
    raise EngineError(f"the RPC server on {endpoint} stopped (see its output above)")


__all__ = ["cap_memory", "check_can_listen", "local_devices", "serve"]
