"""Source tensor rows -> GGUF output bytes (BF16 / F16 / F32 / Q8_0), on a few threads for big blocks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType

from .ggml_q8 import quantize_q8_0
from .safetensors_io import to_float32


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, nearest-even, NaN quieted keeping the sign (gguf-py's rule)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    out = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def encode_rows(values: np.ndarray, src_dtype: str, qtype: GGMLQuantizationType) -> np.ndarray:
    """Source rows (storage dtype `src_dtype`, or float32 when src_dtype == 'F32') -> output bytes."""
    if qtype == GGMLQuantizationType.BF16 and src_dtype == "BF16":
        return values
    if qtype == GGMLQuantizationType.F16 and src_dtype == "F16":
        return values
    f = to_float32(values, src_dtype)
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(f, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return f.astype(np.float16)
    if qtype == GGMLQuantizationType.BF16:
        return bf16_round(f)
    if qtype == GGMLQuantizationType.Q8_0:
        return quantize_q8_0(f.reshape(f.shape[0], -1))
    raise ValueError(f"the converter cannot write {qtype.name}")


_POOL: ThreadPoolExecutor | None = None


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def encode_rows_parallel(block: np.ndarray, dtype: str, qtype: GGMLQuantizationType) -> Iterator[np.ndarray]:
    """Encode a block of rows on a few threads (numpy and ggml release the GIL); output in row order."""
    global _POOL
    n = _workers()
    if n == 1 or block.ndim < 2 or block.shape[0] < 2 * n:
        yield encode_rows(block, dtype, qtype)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="corral-convert")
    yield from _POOL.map(lambda part: encode_rows(part, dtype, qtype), np.array_split(block, n))
