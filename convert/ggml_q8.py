"""Q8_0 quantization: ggml's own `ggml_quantize_chunk` (loaded by `ggml_lib`), numpy fallback.

Both paths give the bytes of ggml's reference `quantize_row_q8_0_ref` (and of gguf-py's numpy port
that llama.cpp's converter uses): per 32 values, d = amax/127 stored as F16, q = round-half-away(x/d).
"""

from __future__ import annotations

import os

import numpy as np

from .ggml_lib import find_ggml

QK8_0 = 32
BLOCK_BYTES = 34
GGML_TYPE_Q8_0 = 8


def _ggml_quantize_chunk():  # type: ignore[no-untyped-def]
    """ggml_quantize_chunk from `ggml_lib`, or None (numpy then) when unavailable or disabled."""
    if os.environ.get("CORRAL_NO_NATIVE_Q8"):
        return None
    lib = find_ggml()
    return None if lib is None else lib.ggml_quantize_chunk


def native_available() -> bool:
    return _ggml_quantize_chunk() is not None


def quantize_q8_0_numpy(rows: np.ndarray) -> np.ndarray:
    """Vectorised Q8_0 of float32 rows (last dim a multiple of 32) -> uint8 [rows, n/32*34]."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows = x.shape[0] if x.ndim > 1 else 1
    blocks = x.reshape(-1, QK8_0)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    scaled = blocks * inv
    a = np.abs(scaled)
    fl = np.floor(a)
    q = np.copysign(fl + np.floor(2 * (a - fl)), scaled).astype(np.int8)
    out = np.empty((blocks.shape[0], BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(n_rows, -1)


def quantize_q8_0(rows: np.ndarray) -> np.ndarray:
    """Q8_0 of a float32 [rows, n] array (n % 32 == 0) -> uint8 [rows, n/32*34], via ggml when available."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    n_rows, n_per_row = x.shape[0], int(np.prod(x.shape[1:]))
    if n_per_row % QK8_0:
        raise ValueError(f"Q8_0 needs rows that are a multiple of {QK8_0} values, got {n_per_row}")
    fn = _ggml_quantize_chunk()
    if fn is None:
        return quantize_q8_0_numpy(x.reshape(n_rows, n_per_row))
    out = np.empty((n_rows, n_per_row // QK8_0 * BLOCK_BYTES), dtype=np.uint8)
    written = fn(GGML_TYPE_Q8_0, x.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    if written != out.nbytes:  # pragma: no cover - would be a ggml ABI mismatch
        return quantize_q8_0_numpy(x.reshape(n_rows, n_per_row))
    return out
