"""The ctypes layer under the engine: llama.cpp parameters from a plan's LoadSettings, ggml devices, log capture.

llama-cpp-python's high-level `Llama` has no parameter for tensor buffer-type overrides or a
load progress callback, so corral fills `llama_model_params` / `llama_context_params` itself
from `LoadSettings` (which also derives the `Llama(**kwargs)` a reference run uses, so both
mean the same thing), and builds the NULL-terminated `tensor_buft_overrides` array with
buffer types from ggml's backend device API.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from llama_cpp import llama_cpp as lc

from corral.convert.errors import EngineError
from corral.offload.load_settings import LoadSettings

_lib = lc._lib

# ggml backend device API (ggml-backend.h), resolved through libllama's handle (it links libggml).
_dev_count = ctypes.CFUNCTYPE(ctypes.c_size_t)(("ggml_backend_dev_count", _lib))
_dev_get = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t)(("ggml_backend_dev_get", _lib))
_dev_name = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(("ggml_backend_dev_name", _lib))
_dev_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(("ggml_backend_dev_type", _lib))
_dev_buft = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(("ggml_backend_dev_buffer_type", _lib))
_buft_name = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(("ggml_backend_buft_name", _lib))

DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}

_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """llama_backend_init once per process."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            lc.llama_backend_init()
            _backend_ready = True


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    kind: str
    buffer_type: str


def devices() -> list[Device]:
    """ggml's registered backend devices (CPU always; CUDA0.. when built with CUDA)."""
    init_backend()
    found = []
    for i in range(_dev_count()):
        dev = _dev_get(i)
        found.append(Device(i, (_dev_name(dev) or b"?").decode(), DEVICE_TYPES.get(_dev_type(dev), "?"),
                            (_buft_name(_dev_buft(dev)) or b"?").decode()))
    return found


def _buffer_type_for(device_name: str) -> int:
    for i in range(_dev_count()):
        dev = _dev_get(i)
        if (_dev_name(dev) or b"").decode().lower() == device_name.lower():
            return int(_dev_buft(dev))
    names = ", ".join(d.name for d in devices())
    raise EngineError(f"the plan puts tensors on device {device_name!r}, which this llama.cpp build does not have "
                      f"(devices: {names})")


class TensorOverrides:
    """A NULL-terminated `llama_model_tensor_buft_override` array that owns its strings."""

    class _Entry(ctypes.Structure):
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        init_backend()
        limit = lc.llama_max_tensor_buft_overrides()
        if len(pairs) >= limit:
            raise EngineError(f"the plan has {len(pairs)} tensor overrides; llama.cpp takes at most {limit - 1}")
        self.pairs = tuple(pairs)
        self._patterns = [p.encode("utf-8") for p, _ in pairs]
        self.array = (self._Entry * (len(pairs) + 1))()
        for i, ((_, device), pattern) in enumerate(zip(pairs, self._patterns)):
            self.array[i].pattern = pattern
            self.array[i].buft = _buffer_type_for(device)
        self.array[len(pairs)].pattern = None
        self.array[len(pairs)].buft = None

    @property
    def address(self) -> int:
        return ctypes.addressof(self.array)


@dataclass
class NativeParams:
    """Filled llama.cpp parameter structs plus the ctypes objects they point into (kept alive here)."""

    model: Any
    context: Any
    n_batch: int
    keep: list[Any] = field(default_factory=list)


def build_params(settings: LoadSettings) -> NativeParams:
    """llama.cpp's model and context parameter structs for these settings (llama.cpp's defaults elsewhere)."""
    mp = lc.llama_model_default_params()
    cp = lc.llama_context_default_params()
    keep: list[Any] = []

    mp.n_gpu_layers = 0x7FFFFFFF if settings.n_gpu_layers < 0 else settings.n_gpu_layers
    mp.split_mode = settings.split_mode_id
    mp.main_gpu = settings.main_gpu
    if settings.tensor_split:
        n_max = lc.llama_max_devices()
        if len(settings.tensor_split) > n_max:
            raise EngineError(f"tensor_split has {len(settings.tensor_split)} entries; this llama.cpp build "
                              f"supports {n_max} devices")
        arr = (ctypes.c_float * n_max)(*settings.tensor_split)
        keep.append(arr)
        mp.tensor_split = arr
    if settings.rpc_servers or settings.devices:
        keep.append(_attach_devices(mp, settings))
    mp.use_extra_bufts = settings.use_extra_bufts
    mmap, mlock = settings.use_mmap, settings.use_mlock
    mp.load_mode = (lc.LLAMA_LOAD_MODE_MMAP_MLOCK if mmap and mlock else lc.LLAMA_LOAD_MODE_MLOCK
                    if mlock else lc.LLAMA_LOAD_MODE_MMAP if mmap else lc.LLAMA_LOAD_MODE_NONE)
    if settings.tensor_overrides:
        table = TensorOverrides(settings.tensor_overrides)
        keep.append(table)
        mp.tensor_buft_overrides = table.address

    n_ctx = settings.n_ctx
    n_batch = min(n_ctx, settings.n_batch) if n_ctx > 0 else settings.n_batch
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = min(n_batch, settings.n_ubatch)
    cp.n_threads = settings.n_threads
    cp.n_threads_batch = settings.n_threads_batch
    cp.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn
                          else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    cp.offload_kqv = True
    cp.type_k = cp.type_v = settings.kv_type_id
    return NativeParams(model=mp, context=cp, n_batch=n_batch, keep=keep)


def _attach_devices(mp: Any, settings: LoadSettings) -> Any:
    """Register the settings' RPC workers, then point `llama_model_params.devices` at a NULL-terminated array of
    the named devices (llama.cpp's default devices when none are named); the array, to be kept alive."""
    from corral.app.runtime import rpc

    for endpoint in settings.rpc_servers:
        rpc.add_server(endpoint)
    if not settings.devices:
        return None
    handles = [rpc.device_handle(name) for name in settings.devices]
    array = (ctypes.c_void_p * (len(handles) + 1))(*handles, None)
    mp.devices = ctypes.addressof(array)
    return array


class LogCapture:
    """Routes llama.cpp's log through Python: recent lines kept for diagnostics, echoed when verbose."""

    _LEVEL_CONT = 5
    _LEVEL_DEBUG = 4

    def __init__(self) -> None:
        self.verbose = False
        self.lines: deque[str] = deque(maxlen=4000)
        self._partial = ""
        self._listeners: list[list[str]] = []
        self._lock = threading.Lock()
        self._callback = lc.llama_log_callback(self._on_log)
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            lc.llama_log_set(self._callback, ctypes.c_void_p(0))
            self._installed = True

    def _on_log(self, level: int, text: bytes | None, user_data: Any) -> None:
        if not text:
            return
        chunk = text.decode("utf-8", errors="replace")
        if self.verbose:
            sys.stderr.write(chunk)
            sys.stderr.flush()
        with self._lock:
            self._partial += chunk
            if "\n" not in self._partial:
                return
            *done, self._partial = self._partial.split("\n")
            for line in done:
                self.lines.append(line)
                for sink in self._listeners:
                    sink.append(line)

    @contextmanager
    def collect(self) -> Iterator[list[str]]:
        """Collect every log line emitted inside the block."""
        sink: list[str] = []
        with self._lock:
            self._listeners.append(sink)
        try:
            yield sink
        finally:
            with self._lock:
                self._listeners.remove(sink)

    def last_error(self) -> str | None:
        """The most recent line that looks like a llama.cpp error, for error messages."""
        for line in reversed(self.lines):
            low = line.lower()
            if "error" in low or "failed" in low or "unable" in low:
                return line.strip()
        return None


LOG = LogCapture()

__all__ = ["LOG", "Device", "NativeParams", "TensorOverrides", "build_params", "devices", "init_backend",
           "lc"]
