"""llama.cpp RPC workers through ggml-rpc: reach and probe a worker, register its devices.

llama-cpp-python built with `GGML_RPC=on` ships `libggml-rpc` beside libllama. A client registers a worker's
devices with `ggml_backend_rpc_add_server` + `ggml_backend_register`; llama.cpp then places layers on them
like local devices (`llama_model_params.devices`, `tensor_split`). A worker runs
`ggml_backend_rpc_start_server` (`rpc_serve`), which blocks and serves one client at a time.

The C client aborts the process (GGML_ABORT) when a worker cannot be reached. So before it ever connects,
`check_reachable` does the protocol's HELLO itself with a timeout: a clear UsageError for a refused, silent,
busy or other-version worker. Failures once connected are `rpc_guard`'s.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corral.app.runtime.rpc_guard import (
    Watchdog,
    connections_to,
    fatal,
    install_abort_hook,
    keep_alive,
    on_fatal,
    split_endpoint,
    track,
    watch_engine,
)
from corral.convert.errors import EngineError, UsageError
from corral.offload.rpc import RpcDevice, RpcLink, RpcWorker, parse_endpoint

# ggml-rpc.h: the protocol version this client speaks (major must match); HELLO is command 14, its request
# carries 24 bytes of connection capabilities, its reply major, minor, patch, a pad byte and 24 bytes of them.
PROTO_MAJOR = 7
_CMD_HELLO = 14
_CAPS_SIZE = 24
CONNECT_TIMEOUT_S = 5.0
DEFAULT_PORT = 50052


def _library_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).resolve().parent / "lib"


_rpc_lib: ctypes.CDLL | None = None
_rpc_checked = False
_lib_lock = threading.Lock()


def _rpc() -> ctypes.CDLL | None:
    """libggml-rpc with its functions typed, or None when this llama-cpp-python was built without RPC."""
    global _rpc_lib, _rpc_checked
    with _lib_lock:
        if _rpc_checked:
            return _rpc_lib
        _rpc_checked = True
        from corral.app.runtime.native import init_backend

        init_backend()  # loads libllama and with it libggml
        candidates = sorted(_library_dir().glob("libggml-rpc.*")) + sorted(_library_dir().glob("ggml-rpc.*"))
        for path in candidates:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                continue
            if not hasattr(lib, "ggml_backend_rpc_add_server"):
                continue
            lib.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
            lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
            lib.ggml_backend_rpc_get_device_memory.restype = None
            lib.ggml_backend_rpc_get_device_memory.argtypes = [
                ctypes.c_char_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
            lib.ggml_backend_rpc_buffer_type.restype = ctypes.c_void_p
            lib.ggml_backend_rpc_buffer_type.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
            lib.ggml_backend_rpc_start_server.restype = None
            lib.ggml_backend_rpc_start_server.argtypes = [
                ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
            _rpc_lib = lib
            break
        return _rpc_lib


def available() -> bool:
    """Whether the installed llama-cpp-python was built with GGML_RPC=on."""
    return _rpc() is not None


def require() -> ctypes.CDLL:
    lib = _rpc()
    if lib is None:
        raise UsageError("this llama-cpp-python was built without RPC support; reinstall it with "
                         "CMAKE_ARGS=\"-DGGML_RPC=on\" (`make venv` does this)")
    return lib


class _Ggml:
    """The few libggml functions the probe and the worker need, typed once."""

    def __init__(self) -> None:
        from corral.app.runtime.native import lc

        lib = lc._lib  # libllama links libggml: its handle resolves ggml's symbols
        vp, sz = ctypes.c_void_p, ctypes.c_size_t

        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            return ctypes.CFUNCTYPE(restype, *argtypes)((name, lib))

        self.register = fn("ggml_backend_register", None, vp)
        self.reg_dev_count = fn("ggml_backend_reg_dev_count", sz, vp)
        self.reg_dev_get = fn("ggml_backend_reg_dev_get", vp, vp, sz)
        self.dev_by_name = fn("ggml_backend_dev_by_name", vp, ctypes.c_char_p)
        self.dev_count = fn("ggml_backend_dev_count", sz)
        self.dev_get = fn("ggml_backend_dev_get", vp, sz)
        self.dev_type = fn("ggml_backend_dev_type", ctypes.c_int, vp)
        self.dev_name = fn("ggml_backend_dev_name", ctypes.c_char_p, vp)
        self.dev_description = fn("ggml_backend_dev_description", ctypes.c_char_p, vp)
        self.dev_memory = fn("ggml_backend_dev_memory", None, vp, ctypes.POINTER(sz), ctypes.POINTER(sz))
        self.buft_alloc = fn("ggml_backend_buft_alloc_buffer", vp, vp, sz)
        self.buffer_free = fn("ggml_backend_buffer_free", None, vp)
        self.buffer_base = fn("ggml_backend_buffer_get_base", vp, vp)
        self.tensor_overhead = fn("ggml_tensor_overhead", sz)
        self.new_tensor_1d = fn("ggml_new_tensor_1d", vp, vp, ctypes.c_int, ctypes.c_int64)
        self.tensor_alloc = fn("ggml_backend_tensor_alloc", ctypes.c_int, vp, vp, vp)
        self.tensor_set = fn("ggml_backend_tensor_set", None, vp, vp, sz, sz)
        self.ggml_free = fn("ggml_free", None, vp)

        class InitParams(ctypes.Structure):
            _fields_ = [("mem_size", sz), ("mem_buffer", vp), ("no_alloc", ctypes.c_bool)]

        self.InitParams = InitParams
        self.ggml_init = ctypes.CFUNCTYPE(vp, InitParams)(("ggml_init", lib))

    def memory(self, dev: int) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        return int(free.value), int(total.value)


_ggml_api: _Ggml | None = None


def ggml_api() -> _Ggml:
    """The typed libggml functions (resolved once)."""
    global _ggml_api
    if _ggml_api is None:
        _ggml_api = _Ggml()
    return _ggml_api


# -- reaching a worker ------------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("connection closed")
        data += chunk
    return data


def check_reachable(endpoint: str, *, timeout: float = CONNECT_TIMEOUT_S) -> float:
    """Connect and do the protocol's HELLO within `timeout`; the round trip in seconds. A worker that is down,
    silent, busy with another client or of another protocol version is a UsageError with one line."""
    endpoint = parse_endpoint(endpoint)
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            start = time.perf_counter()
            sock.sendall(struct.pack("<BQ", _CMD_HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            reply = _recv_exact(sock, size) if 4 <= size <= 4096 else b""
            elapsed = time.perf_counter() - start
    except TimeoutError:
        raise UsageError(f"RPC worker {endpoint} did not answer within {timeout:g} s (busy with another client, "
                         "or a firewall drops the connection)") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UsageError(f"cannot reach RPC worker {endpoint}: {reason}") from None
    if len(reply) < 3:
        raise UsageError(f"{endpoint} did not answer like an RPC worker (is it `corral worker`?)")
    if reply[0] != PROTO_MAJOR:
        raise UsageError(f"RPC worker {endpoint} speaks protocol {reply[0]}.{reply[1]}.{reply[2]}; this corral "
                         f"speaks {PROTO_MAJOR}.x (install the same llama-cpp-python on both machines)")
    return elapsed


_registered: dict[str, tuple[int, ...]] = {}
_register_lock = threading.Lock()


def add_server(endpoint: str) -> tuple[str, ...]:
    """Register the worker's devices with ggml (once per endpoint and process); their ggml device names."""
    lib = require()
    endpoint = parse_endpoint(endpoint)
    with _register_lock:
        if endpoint not in _registered:
            check_reachable(endpoint)
            install_abort_hook()
            reg = lib.ggml_backend_rpc_add_server(endpoint.encode())
            if not reg:
                raise UsageError(f"RPC worker {endpoint} exposes no devices")
            api = ggml_api()
            api.register(reg)
            _registered[endpoint] = tuple(api.reg_dev_get(reg, i) for i in range(api.reg_dev_count(reg)))
            track(endpoint)
        elif not connections_to(endpoint):
            # ggml-rpc will connect again (it closed when nothing of ours remained there): make sure the worker
            # answers and is not busy with another client, or its HELLO would wait for ever
            check_reachable(endpoint)
        api = ggml_api()
        return tuple(api.dev_name(dev).decode() for dev in _registered[endpoint])


def registered() -> tuple[str, ...]:
    """The endpoints registered in this process."""
    return tuple(_registered)


def device_handle(name: str) -> int:
    """The ggml device handle for a device name (local or a registered worker's), or a UsageError."""
    dev = ggml_api().dev_by_name(name.encode())
    if not dev:
        from corral.app.runtime.native import devices

        known = ", ".join(d.name for d in devices())
        raise UsageError(f"no ggml device named {name!r} (devices: {known})")
    return int(dev)


# -- probing -------------------------------------------------------------------------------------------
def probe(endpoint: str, *, measure_link: bool = True) -> RpcWorker:
    """The worker's devices with their memory, and (optionally) the measured link to it."""
    endpoint = parse_endpoint(endpoint)
    names = add_server(endpoint)
    api = ggml_api()
    devices = []
    for index, (dev, name) in enumerate(zip(_registered[endpoint], names)):
        free, total = api.memory(dev)
        devices.append(RpcDevice(endpoint=endpoint, index=index, name=name,
                                 description=(api.dev_description(dev) or b"").decode(), free=free, total=total))
    link = measure(endpoint) if measure_link else RpcLink(endpoint, 0.0, 0.0)
    return RpcWorker(endpoint=endpoint, devices=tuple(devices), link=link)


def _round_trip(lib: ctypes.CDLL, endpoint: bytes) -> float:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    start = time.perf_counter()
    lib.ggml_backend_rpc_get_device_memory(endpoint, 0, ctypes.byref(free), ctypes.byref(total))
    return time.perf_counter() - start


def measure(endpoint: str, *, rounds: int = 8, chunk: int = 4 << 20, chunks: int = 4) -> RpcLink:
    """Latency: the fastest of a few small round trips. Bandwidth: `chunks` writes of `chunk` bytes into a
    buffer on the worker, closed by a round trip so every byte has arrived (below ggml-rpc's 10 MiB
    hash-cache threshold, so the data really travels)."""
    from gguf import GGMLQuantizationType

    lib = require()
    endpoint = parse_endpoint(endpoint)
    add_server(endpoint)
    key = endpoint.encode()
    api = ggml_api()
    # ggml-rpc keeps a worker's connection only while something on it is alive (here: this buffer); without
    # it every call would connect and say HELLO again
    buffer = api.buft_alloc(lib.ggml_backend_rpc_buffer_type(key, 0), chunk)
    if not buffer:
        raise EngineError(f"RPC worker {endpoint} could not allocate {chunk} bytes for the link test")
    params = api.InitParams(api.tensor_overhead() * 4, None, True)
    ctx = api.ggml_init(params)
    try:
        latency = min(_round_trip(lib, key) for _ in range(rounds))
        tensor = api.new_tensor_1d(ctx, int(GGMLQuantizationType.I8), chunk)
        if api.tensor_alloc(buffer, tensor, api.buffer_base(buffer)) != 0:
            raise EngineError(f"RPC worker {endpoint}: could not place the link-test tensor")
        data = (ctypes.c_uint8 * chunk).from_buffer_copy(os.urandom(chunk))
        api.tensor_set(tensor, data, 0, chunk)  # warm-up: the connection's first large write
        _round_trip(lib, key)
        start = time.perf_counter()
        for _ in range(chunks):
            api.tensor_set(tensor, data, 0, chunk)
        _round_trip(lib, key)
        elapsed = max(time.perf_counter() - start - latency, 1e-9)
    finally:
        api.ggml_free(ctx)
        api.buffer_free(buffer)
    return RpcLink(endpoint=endpoint, latency_s=latency, bandwidth=chunk * chunks / elapsed)


def serve(endpoint: str, cache_dir: str | Path | None, n_threads: int, devices: Sequence[str] = (), *,
          mem: int | None = None) -> None:
    """Run a worker (blocks for good): see `rpc_serve.serve`."""
    from corral.app.runtime.rpc_serve import serve as run

    run(endpoint, cache_dir, n_threads, devices, mem=mem)


__all__ = ["DEFAULT_PORT", "Watchdog", "add_server", "available", "check_reachable", "device_handle", "fatal",
           "ggml_api", "install_abort_hook", "keep_alive", "measure", "on_fatal", "probe", "registered", "require",
           "serve", "watch_engine"]
