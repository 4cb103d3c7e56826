"""ggml's row quantizers, through ctypes, from the ggml library that llama-cpp-python ships.

The only place corral loads ggml itself: `ggml_quantize_chunk` (any type, optional importance
weights), `ggml_quantize_init`, `ggml_quantize_requires_imatrix` and `ggml_validate_row_data`
(ggml/include/ggml.h). Pointer arguments are passed as addresses (ints).
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path

from .errors import EngineError

_NAMES = ("libggml-base.*", "ggml-base.dll", "libggml.*")


def _library_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _declare(lib: ctypes.CDLL) -> None:
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, vp, vp, i64, i64, i64, vp]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, vp, ctypes.c_size_t]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_get_name.argtypes = lib.ggml_nrows.argtypes = [vp]  # a graph node's name and rows (eval callbacks)
    lib.ggml_get_name.restype, lib.ggml_nrows.restype = ctypes.c_char_p, i64


@cache
def find_ggml() -> ctypes.CDLL | None:
    """ggml's base library with its quantizer functions declared, or None when it cannot be loaded."""
    lib_dir = _library_dir()
    if lib_dir is None:
        return None
    for pattern in _NAMES:
        for path in sorted(lib_dir.glob(pattern)):
            try:
                lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                _declare(lib)
            except (OSError, AttributeError):
                continue
            return lib
    return None


def ggml() -> ctypes.CDLL:
    """ggml's base library; EngineError when llama-cpp-python's install lacks it."""
    lib = find_ggml()
    if lib is None:
        raise EngineError(f"ggml's library was not found in {_library_dir() or 'the llama_cpp package'}")
    return lib
