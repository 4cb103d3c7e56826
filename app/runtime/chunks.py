"""Text in fixed-size chunks through a loaded model: what perplexity, KL divergence and importance matrices read.

The method is llama.cpp's (`llama-perplexity`, `llama-imatrix`): the whole text is tokenized once (BOS added as the
model asks), cut into consecutive chunks of `n_ctx` tokens, the first token of each chunk replaced by BOS, and each
chunk decoded from an empty KV cache.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import llama_cpp as _lc
import numpy as np

from corral.app.runtime.engine import LlamaEngine
from corral.convert.errors import Cancelled, EngineError, UsageError


@dataclass(frozen=True)
class Chunks:
    """A text's tokens cut into chunks of `n_ctx` (the tail that does not fill a chunk is dropped)."""

    n_ctx: int
    tokens: tuple[int, ...]  # the whole text, as tokenized
    count: int  # full chunks in the text

    def chunk(self, i: int, bos_id: int) -> list[int]:
        """Chunk `i`, with its first token replaced by BOS when the model has one."""
        start = i * self.n_ctx
        out = list(self.tokens[start:start + self.n_ctx])
        if bos_id >= 0:
            out[0] = bos_id
        return out


def text_chunks(engine: LlamaEngine, text: str, n_ctx: int, limit: int | None = None) -> Chunks:
    """Tokenize `text` as the model does and cut it into chunks of `n_ctx` tokens (at most `limit` of them)."""
    if n_ctx < 8:
        raise UsageError(f"--ctx {n_ctx} is too small (at least 8 tokens)")
    if n_ctx > engine.n_ctx:
        raise UsageError(f"--ctx {n_ctx} is larger than the context the model was loaded with ({engine.n_ctx})")
    tokens = engine.tokenize(text, add_special=engine._add_bos, parse_special=False)
    count = len(tokens) // n_ctx
    if count == 0:
        raise UsageError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; "
                              "give a longer text or a smaller --ctx")
    if limit is not None:
        count = min(count, max(1, limit))
    return Chunks(n_ctx, tuple(tokens), count)


def fill_batch(batch: Any, tokens: list[int], start: int, count: int, outputs_from: int) -> None:
    """Put tokens[start:start + count] (positions start..) in `batch`, sequence 0; positions from `outputs_from`
    on are outputs (llama.cpp computes their logits, and the last layer only for outputs)."""
    for j in range(count):
        batch.token[j] = tokens[start + j]
        batch.pos[j] = start + j
        batch.n_seq_id[j] = 1
        batch.seq_id[j][0] = 0
        batch.logits[j] = 1 if start + j >= outputs_from else 0
    batch.n_tokens = count


def decode_chunk(engine: LlamaEngine, tokens: list[int], logits_from: int,
                 cancel: threading.Event | None = None) -> np.ndarray:
    """Decode `tokens` from an empty KV cache; the logits of positions `logits_from`.. as float32 [n, n_vocab].

    With `logits_from == len(tokens)` no logits are kept (an importance matrix only needs the activations).
    Raises Cancelled when `cancel` is set between batches.
    """
    n = len(tokens)
    n_vocab = int(_lc.llama_vocab_n_tokens(engine._vocab))
    out = np.empty((n - logits_from, n_vocab), dtype=np.float32)
    step = engine._n_batch
    batch = _lc.llama_batch_init(step, 0, 1)
    try:
        with engine._lock:
            _lc.llama_memory_clear(_lc.llama_get_memory(engine._ctx), True)
            engine._cached = []
            for start in range(0, n, step):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("interrupted")
                m = min(step, n - start)
                fill_batch(batch, tokens, start, m, outputs_from=logits_from)
                rc = _lc.llama_decode(engine._ctx, batch)
                if rc != 0:
                    _lc.llama_memory_clear(_lc.llama_get_memory(engine._ctx), True)
                    raise EngineError(f"llama.cpp failed to decode a chunk (code {rc})")
                for j in range(max(0, logits_from - start), m):
                    ptr = _lc.llama_get_logits_ith(engine._ctx, j)
                    out[start + j - logits_from] = np.ctypeslib.as_array(
                        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
            _lc.llama_memory_clear(_lc.llama_get_memory(engine._ctx), True)
    finally:
        _lc.llama_batch_free(batch)
    return out


def iter_chunks(engine: LlamaEngine, chunks: Chunks, logits_from: int,
                cancel: threading.Event | None = None) -> Iterator[tuple[int, list[int], np.ndarray]]:
    """(index, tokens, logits from `logits_from`) for each chunk in order."""
    for i in range(chunks.count):
        tokens = chunks.chunk(i, engine.bos_id)
        yield i, tokens, decode_chunk(engine, tokens, logits_from, cancel)
