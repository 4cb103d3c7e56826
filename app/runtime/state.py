"""A context's KV cache as bytes, and what those bytes depend on (for resuming conversations from disk).

`StateKey` is light (no llama.cpp at import) so the chat store can use it; `capture`/`restore` call llama.cpp's
per-sequence state API on a live context (`llama_state_seq_get_data` / `llama_state_seq_set_data`).
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

SEQ = 0  # corral runs one sequence per context
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class StateKey:
    """What a saved KV state depends on: the model file's identity, the context's settings and llama.cpp."""

    model_id: str  # file size + hash of the GGUF header (not the path: a moved file still matches)
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    runtime: str  # llama.cpp build: its state format may change between versions


@runtime_checkable
class Resumable(Protocol):
    """An engine whose KV cache can be saved and put back."""

    last_cached_tokens: int  # prompt tokens of the last generation whose KV was already there (or restored)

    def state_key(self) -> StateKey:
        """What the engine's KV state depends on."""
        ...

    def export_state(self) -> tuple[list[int], bytes]:
        """The tokens whose keys and values are cached, and the cache as bytes."""
        ...

    def import_state(self, tokens: Sequence[int], data: bytes) -> bool:
        """Put back a state from `export_state` of an engine with the same `state_key`; False if refused."""
        ...


def model_identity(files: list[Path], data_offset: int) -> str:
    """Total size of the model's files plus the SHA-256 of the first file's header (metadata and tensor table)."""
    digest = hashlib.sha256()
    with open(files[0], "rb") as f:
        left = data_offset
        while left > 0:
            chunk = f.read(min(left, _HASH_CHUNK))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    size = sum(p.stat().st_size for p in files)
    return f"{size}-{digest.hexdigest()[:32]}"


def key_for(files: Sequence[Path], data_offset: int, n_ctx: int, kv_type: str, flash_attn: bool) -> StateKey:
    """The StateKey of a context with these settings over the model in `files` (its GGUF shards; the first
    one's header ends at `data_offset`)."""
    import llama_cpp

    return StateKey(model_identity(list(files), data_offset), n_ctx, kv_type, kv_type, flash_attn,
                    f"llama-cpp-python {llama_cpp.__version__}")


def capture(lc: Any, ctx: Any) -> bytes:
    """The sequence's KV state as bytes."""
    size = int(lc.llama_state_seq_get_size(ctx, SEQ))
    buf = (ctypes.c_uint8 * size)()
    written = int(lc.llama_state_seq_get_data(ctx, buf, size, SEQ))
    return bytes(memoryview(buf)[:written])


def restore(lc: Any, ctx: Any, data: bytes) -> bool:
    """Replace the sequence's KV state with `data` (from `capture` on a context with the same StateKey)."""
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    ok = int(lc.llama_state_seq_set_data(ctx, buf, len(data), SEQ)) > 0
    if not ok:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    return ok
