"""Importance matrices through llama.cpp's eval callback: what `llama-imatrix` computes, without llama-imatrix.

While llama.cpp runs a graph it asks the callback, node by node, whether we want the node's result (`ask`);
we say yes for matrix multiplications (GGML_OP_MUL_MAT) whose first source is a model weight `blk.*` (and
`output.weight` with `process_output`), and when the node has been computed we read its second source: the
F32 activations [rows, columns] the weight was multiplied with. Per weight we add up, per column, the squares
of those activations over every row, and count the rows (tools/imatrix/imatrix.cpp `collect_imatrix`; one count
per dense weight). Sums are taken in float32 within one call (at most n_ubatch rows) and kept in float64 across
calls and chunks (llama.cpp keeps float32 throughout); files store float32 as llama.cpp's do.

Chunks are decoded the way llama-imatrix decodes them (llama-perplexity's chunking, BOS first, every token an
output: with fewer outputs llama.cpp computes the last layer's attention output and feed-forward only for the
output rows). What a chunk adds is held apart until the chunk is complete, so an interrupted run keeps exactly
the complete chunks.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp as _lc
import numpy as np
from gguf import GGMLQuantizationType

from corral.app.runtime.chunks import Chunks, fill_batch
from corral.app.runtime.engine import LlamaEngine
from corral.convert import ggml_lib
from corral.convert.errors import Cancelled, EngineError
from corral.convert.imatrix_write import ImatrixData, ImatrixEntry

# struct ggml_tensor of the pinned ggml (ggml/include/ggml.h): GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64 bytes,
# GGML_MAX_SRC 10, GGML_MAX_NAME 64.
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME = 4, 10, 64
GGML_OBJECT_SIZE = 32  # struct ggml_object (offs, size, next, type, padding): ggml_tensor_overhead() adds it
F32 = int(GGMLQuantizationType.F32)


class GgmlTensor(ctypes.Structure):
    """A read-only view of `struct ggml_tensor`."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class Ggml:
    """The few ggml functions the collector calls, from the library llama-cpp-python loaded."""

    def __init__(self) -> None:
        lib = ggml_lib.ggml()
        self.lib = lib
        self.op_name = lib.ggml_op_name
        self.op_name.restype, self.op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
        self.tensor_overhead = lib.ggml_tensor_overhead
        self.tensor_overhead.restype, self.tensor_overhead.argtypes = ctypes.c_size_t, []
        self.buffer_is_host = lib.ggml_backend_buffer_is_host
        self.buffer_is_host.restype, self.buffer_is_host.argtypes = ctypes.c_bool, [ctypes.c_void_p]
        self.tensor_get = lib.ggml_backend_tensor_get
        self.tensor_get.restype = None
        self.tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.nbytes = lib.ggml_nbytes
        self.nbytes.restype, self.nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        expected = GGML_OBJECT_SIZE + ctypes.sizeof(GgmlTensor)
        if self.tensor_overhead() != expected:
            raise EngineError(f"this llama.cpp build's struct ggml_tensor is not the one corral reads "
                              f"(overhead {self.tensor_overhead()} bytes, expected {expected})")
        self.mul_mat = self._op_id(b"MUL_MAT")

    def _op_id(self, wanted: bytes) -> int:
        # ggml_op_name indexes a table of GGML_OP_COUNT names: stop at the first match, never read past it
        for op in range(1, 256):
            name = self.op_name(op)
            if name == wanted:
                return op
            if not name:
                break
        raise EngineError(f"this llama.cpp build has no GGML_OP_{wanted.decode()}")


def weight_name(raw: bytes) -> str:
    """A weight's own name from a graph tensor's: `CUDA0#blk.0.attn_k.weight#0` -> `blk.0.attn_k.weight`."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


class _Sums:
    __slots__ = ("sums", "count")

    def __init__(self, size: int) -> None:
        self.sums = np.zeros(size, dtype=np.float64)
        self.count = 0


class ImatrixCollector:
    """The eval callback: call it as llama.cpp's `cb_eval` (tensor address, ask, user data)."""

    def __init__(self, *, process_output: bool = False) -> None:
        self.process_output = process_output
        self._ggml = Ggml()
        self._pending: dict[str, _Sums] = {}  # the chunk being decoded
        self._totals: dict[str, _Sums] = {}  # complete chunks
        self.chunks = 0
        self.error: BaseException | None = None
        self._copy = np.empty(0, dtype=np.uint8)  # activations copied off a device

    # -- the callback ------------------------------------------------------------------------
    def __call__(self, tensor: int, ask: bool, _user: Any = None) -> bool:
        try:  # nothing may escape into C; the first error is kept and raised after the decode
            node = GgmlTensor.from_address(tensor)
            name = self._wanted(node)
            if ask:
                return name is not None
            if name is not None:
                self._add(name, node)
        except BaseException as exc:  # noqa: BLE001
            if self.error is None:
                self.error = exc
            return not ask
        return True

    def _wanted(self, node: GgmlTensor) -> str | None:
        if node.op != self._ggml.mul_mat or not node.src[0] or not node.src[1]:
            return None
        if GgmlTensor.from_address(node.src[1]).type != F32:
            return None
        name = weight_name(GgmlTensor.from_address(node.src[0]).name)
        if name.startswith("blk.") or (self.process_output and name == "output.weight"):
            return name
        return None

    def _add(self, name: str, node: GgmlTensor) -> None:
        weight = GgmlTensor.from_address(node.src[0])
        x = self._activations(node.src[1])  # [ne3, ne2, ne1, ne0]
        n_mat = int(weight.ne[2] * weight.ne[3])
        ne0 = x.shape[3]
        acc = self._pending.get(name)
        if acc is None:
            acc = self._pending[name] = _Sums(ne0 * n_mat)
        elif acc.sums.size != ne0 * n_mat:
            raise EngineError(f"inconsistent activation size for {name}: {ne0 * n_mat} after {acc.sums.size}")
        sums = acc.sums.reshape(n_mat, ne0)
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                mat = (i3 % int(weight.ne[3])) * int(weight.ne[2]) + i2 % int(weight.ne[2])
                rows = x[i3, i2]
                sums[mat] += np.einsum("ij,ij->j", rows, rows)
        acc.count += x.shape[0] * x.shape[1] * x.shape[2] // n_mat

    def _activations(self, address: int) -> np.ndarray:
        t = GgmlTensor.from_address(address)
        ne = [int(n) for n in t.ne]
        nb = [int(n) for n in t.nb]
        if nb[0] != 4:
            raise EngineError(f"activations of {t.name.decode(errors='replace')} are not contiguous rows")
        extent = 4 + sum((n - 1) * s for n, s in zip(ne, nb))
        if not t.buffer or self._ggml.buffer_is_host(t.buffer):
            if not t.data:
                raise EngineError(f"activations of {t.name.decode(errors='replace')} have no data")
            base: Any = (ctypes.c_char * extent).from_address(t.data)
        else:  # in a device's memory: copied out (ggml_backend_tensor_get synchronises)
            size = int(self._ggml.nbytes(address))
            if self._copy.size < size:
                self._copy = np.empty(size, dtype=np.uint8)
            self._ggml.tensor_get(address, self._copy.ctypes.data, 0, size)
            base = self._copy
        return np.ndarray(tuple(reversed(ne)), dtype=np.float32, buffer=base, strides=tuple(reversed(nb)))

    # -- chunks ----------------------------------------------------------------------------
    def check(self) -> None:
        """Raise what the callback caught (it cannot raise into llama.cpp)."""
        if self.error is not None:
            error, self.error = self.error, None
            self._pending.clear()
            raise error

    def end_chunk(self) -> None:
        """The chunk being decoded is complete: add it to the totals."""
        self.check()
        for name, acc in self._pending.items():
            if not np.all(np.isfinite(acc.sums)):
                self._pending.clear()
                raise EngineError(f"non-finite activations in {name}: the model's output is broken")
        for name, acc in self._pending.items():
            total = self._totals.get(name)
            if total is None:
                self._totals[name] = acc
            else:
                total.sums += acc.sums
                total.count += acc.count
        self._pending = {}
        self.chunks += 1

    def drop_chunk(self) -> None:
        """Forget what an incomplete chunk added."""
        self._pending.clear()
        self.error = None

    def data(self, chunk_size: int, datasets: tuple[str, ...]) -> ImatrixData:
        """The complete chunks as file contents (one count per dense weight, as llama.cpp writes them)."""
        entries = {name: ImatrixEntry(acc.sums.astype(np.float32).reshape(1, -1), np.array([acc.count], np.int64))
                   for name, acc in sorted(self._totals.items())}
        return ImatrixData(entries, self.chunks, chunk_size, datasets)


@dataclass(frozen=True)
class ImatrixRun:
    """The outcome of `compute_imatrix`."""

    data: ImatrixData
    chunks_total: int  # chunks the text (and --chunks) asked for
    seconds: float

    @property
    def complete(self) -> bool:
        return self.data.chunk_count == self.chunks_total


def decode_all_outputs(engine: LlamaEngine, tokens: list[int], cancel: threading.Event | None = None) -> None:
    """Decode `tokens` from an empty KV cache with every position an output (as llama-imatrix does); the
    logits are left in llama.cpp. Setting `cancel` aborts between and inside batches (Cancelled)."""
    n, step = len(tokens), engine._n_batch
    batch = _lc.llama_batch_init(step, 0, 1)
    abort = _lc.ggml_abort_callback(lambda _data: bool(cancel is not None and cancel.is_set()))
    try:
        with engine._lock:
            ctx = engine._ctx
            if ctx is None:
                raise EngineError("the model has been closed")
            _lc.llama_set_abort_callback(ctx, abort, None)
            memory = _lc.llama_get_memory(ctx)
            _lc.llama_memory_clear(memory, True)
            engine._cached = []
            try:
                for start in range(0, n, step):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("interrupted")
                    fill_batch(batch, tokens, start, min(step, n - start), outputs_from=0)
                    rc = _lc.llama_decode(ctx, batch)
                    if rc != 0:
                        if cancel is not None and cancel.is_set():
                            raise Cancelled("interrupted")
                        raise EngineError(f"llama.cpp failed to decode a chunk (code {rc})")
            finally:
                _lc.llama_memory_clear(memory, True)
                _lc.llama_set_abort_callback(ctx, _lc.ggml_abort_callback(), None)
    finally:
        _lc.llama_batch_free(batch)


def compute_imatrix(engine: LlamaEngine, collector: ImatrixCollector, chunks: Chunks, *, dataset: str,
                    progress: Callable[[int, int], None] | None = None,
                    cancel: threading.Event | None = None) -> ImatrixRun:
    """Decode every chunk with `collector` installed as the engine's eval callback; stops early (keeping the
    complete chunks) when `cancel` is set."""
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, chunks.count)
    for i in range(chunks.count):
        if cancel is not None and cancel.is_set():
            break
        try:
            decode_all_outputs(engine, chunks.chunk(i, engine.bos_id), cancel)
        except Cancelled:
            collector.drop_chunk()
            break
        except BaseException:
            collector.drop_chunk()
            raise
        collector.end_chunk()
        if progress is not None:
            progress(i + 1, chunks.count)
    return ImatrixRun(collector.data(chunks.n_ctx, (dataset,)), chunks.count, time.perf_counter() - t0)
