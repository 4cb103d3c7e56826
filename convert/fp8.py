"""Meta's FP8 checkpoints (quant_method fbgemm_fp8): F8_E4M3 weights with per-row float scales.

Each quantized linear layer stores `weight` as F8_E4M3 [out, in] and `weight_scale` as a float
[out, 1]; the real weight is float(weight) * scale, row by row. Modules listed in
`modules_to_not_convert` (and embeddings, norms, lm_head) are plain BF16.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def e4m3_table() -> np.ndarray:
    """float32 value of every F8_E4M3 (fn variant: bias 7, no infinities, 0x7F/0xFF NaN) byte."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    mant = (codes & 0x7).astype(np.float64)
    normal = (1.0 + mant / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = (mant / 8.0) * 2.0**-6
    values = sign * np.where(exp == 0, subnormal, normal)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


def e4m3_to_float32(codes: np.ndarray) -> np.ndarray:
    """Decode F8_E4M3 bytes (uint8 array) to float32 exactly."""
    return e4m3_table()[np.asarray(codes, dtype=np.uint8)]


def float32_to_e4m3(values: np.ndarray) -> np.ndarray:
    """Encode float32 to the nearest F8_E4M3 byte (ties to even code; saturates at +-448). For tests."""
    table = e4m3_table()
    finite = np.where(np.isnan(table), np.inf, table)
    order = np.argsort(finite, kind="stable")
    sorted_vals = finite[order]
    # Drop the duplicate zero (-0) and NaN codes so the search sees a strictly increasing grid.
    with np.errstate(invalid="ignore"):
        keep = np.concatenate([[True], np.diff(sorted_vals) > 0]) & np.isfinite(sorted_vals)
    grid, grid_codes = sorted_vals[keep], order[keep]
    v = np.clip(np.asarray(values, dtype=np.float32), grid[0], grid[-1])
    hi = np.clip(np.searchsorted(grid, v), 1, len(grid) - 1)
    lo = hi - 1
    pick_hi = (grid[hi] - v) < (v - grid[lo])
    tie = (grid[hi] - v) == (v - grid[lo])
    pick_hi = pick_hi | (tie & (grid_codes[hi] % 2 == 0))
    return np.where(pick_hi, grid_codes[hi], grid_codes[lo]).astype(np.uint8)


def dequantize_rows(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32(weight) * scale for a block of rows: codes uint8 [rows, in], scale float32 [rows, 1]."""
    values = e4m3_to_float32(codes)
    values *= np.asarray(scale, dtype=np.float32).reshape(-1, 1)
    return values

