"""Speculative decoding: a small draft model proposes tokens, the target checks them all in one pass.

Each step the draft decodes k tokens one by one; the target then decodes the pending token plus
the k drafts as one batch with logits at every position, which costs about one token's pass when
the target is memory-bound (its weights are read once). Greedy keeps the drafts while they equal
the target's argmax, so the text is token for token the target's own; sampling uses the rule in
`spec_sampling.verify`, which keeps the target's distribution. Rejected positions are removed from
both KV caches (`llama_memory_seq_rm`), so each engine's `_cached` stays exact.

Adaptive: k doubles after a fully accepted step and drops to one more than the accepted count
after a rejection (1..draft_max). The time per produced token is measured both while drafting and
during plain steps; when drafting is slower (or nothing was accepted in the last few steps), it is
switched off for a window that grows fourfold each time it fails again (so a useless draft costs a
few short probes).
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from corral.app.runtime.api import Generation, GenerationStats, SamplingSettings, StopReason
from corral.app.runtime.native import lc as _lc
from corral.app.runtime.spec_sampling import (
    Distribution,
    chain_distribution,
    greedy_choice,
    verify,
    verify_greedy,
)
from corral.convert.errors import EngineError

if TYPE_CHECKING:
    from corral.app.runtime.engine import LlamaEngine

DEFAULT_DRAFT_MAX = 8
WARMUP_PLAIN = 1  # plain tokens first, on the first reply only: they time the target alone (a streamed target's
# token costs a whole pass over the disk, so the warm-up is kept short; later replies reuse the clocks)
PROBE_STEPS = 2  # drafting steps measured before comparing with plain decoding
FIRST_BACKOFF = 32  # plain tokens after drafting lost; 4x as many each time it loses again
MAX_BACKOFF = 1024
STREAMING_BACKOFF = 8  # the first back-off when the target streams from disk
# A target that streams weights from disk pays for the draft's memory on every token (what the draft holds cannot
# stay resident), drafting or not: after this many lost probes the draft is closed and its memory given back.
RELEASE_AFTER_LOSSES = 2
# llama.cpp's CPU matmuls use another kernel for batches of two or more tokens, so the target's logits from a
# verifying batch can differ from a one-token pass in the last bits: a greedy choice whose lead over the
# runner-up is below this is taken again from a one-token pass, as plain decoding would.
TIE_MARGIN = 0.005


@dataclass
class _Clock:
    """Seconds per produced token, as an exponential moving average."""

    value: float = 0.0
    weight: float = 0.3

    def add(self, seconds: float, tokens: int) -> None:
        sample = seconds / max(tokens, 1)
        self.value = sample if self.value == 0.0 else self.value + self.weight * (sample - self.value)


class Speculator:
    """Drives a target `LlamaEngine` with a draft `LlamaEngine` (the target's lock is held by the caller)."""

    def __init__(self, target: LlamaEngine, draft: LlamaEngine, draft_max: int = DEFAULT_DRAFT_MAX,
                 adaptive: bool = True) -> None:
        if draft_max < 1:
            raise ValueError("draft_max must be at least 1")
        self.target, self.draft, self.draft_max, self.adaptive = target, draft, draft_max, adaptive
        self.k = min(2, draft_max)
        self._n_vocab = int(_lc.llama_vocab_n_tokens(target._vocab))
        self._batch = _lc.llama_batch_init(draft_max + 1, 0, 1)
        self.total_drafted = 0
        self.total_accepted = 0
        self._plain = _Clock()  # seconds per token without drafting, kept across replies
        self.losses = 0  # probes drafting lost (speed or acceptance)
        self.released = False  # the draft was closed for good (see RELEASE_AFTER_LOSSES)

    def release(self) -> None:
        """Close the draft for good and let a streaming target keep more of itself resident."""
        if self.released:
            return
        self.released = True
        self.draft.close()
        if self.target.streamer is not None:
            self.target.streamer.refresh()

    def close(self) -> None:
        if self._batch is not None:
            _lc.llama_batch_free(self._batch)
            self._batch = None
        self.draft.close()  # closing twice is harmless (a released draft is closed already)

    # -- KV bookkeeping ----------------------------------------------------------------------
    def _logits(self, engine: LlamaEngine, i: int) -> np.ndarray:
        ptr = _lc.llama_get_logits_ith(engine._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    @staticmethod
    def _trim(engine: LlamaEngine, n: int) -> None:
        """Keep the KV of the first `n` cached tokens only."""
        if len(engine._cached) > n:
            if not _lc.llama_memory_seq_rm(_lc.llama_get_memory(engine._ctx), 0, n, -1):
                engine._reuse_prefix([])
                raise EngineError("llama.cpp could not remove rejected tokens from the KV cache")
            del engine._cached[n:]

    @staticmethod
    def _decode(engine: LlamaEngine, tokens: list[int]) -> None:
        """Decode `tokens` after the cached ones (logits for the last)."""
        arr = (_lc.llama_token * len(tokens))(*tokens)
        rc = _lc.llama_decode(engine._ctx, _lc.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            engine._reuse_prefix([])
            raise EngineError(f"llama.cpp failed to decode (code {rc})")
        engine._cached.extend(tokens)

    def _sync_draft(self, sequence: list[int]) -> None:
        """Bring the draft's cache to `sequence` (its last token decoded, logits ready)."""
        draft = self.draft
        same = 0
        for a, b in zip(draft._cached, sequence):
            if a != b:
                break
            same += 1
        self._trim(draft, min(same, len(sequence) - 1))
        self._decode(draft, sequence[len(draft._cached):])

    def _verify_batch(self, tokens: list[int]) -> list[np.ndarray]:
        """Decode `tokens` on the target with logits at every position; the logits rows."""
        target, batch = self.target, self._batch
        base = len(target._cached)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = base + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = len(tokens)
        rc = _lc.llama_decode(target._ctx, batch)
        if rc != 0:
            target._reuse_prefix([])
            raise EngineError(f"llama.cpp failed to decode the drafted tokens (code {rc})")
        target._cached.extend(tokens)
        return [self._logits(target, i) for i in range(len(tokens))]

    # -- the loop ----------------------------------------------------------------------------
    def run(self, prompt: list[int], settings: SamplingSettings, on_text: Callable[[str], None] | None,
            cancel: threading.Event | None, keep: frozenset[int], t0: float, t1: float) -> Generation:
        """Generate after the target decoded `prompt` (at t1, started at t0); like `LlamaEngine._generate`."""
        target, draft = self.target, self.draft
        n_prompt = len(prompt)
        max_new = settings.max_new_tokens(target.n_ctx - n_prompt)
        greedy = settings.temperature <= 0
        rng = np.random.default_rng(settings.seed)
        can_draft = n_prompt + 1 < draft.n_ctx
        if can_draft and draft._decode_prompt(prompt, cancel):
            return Generation("", GenerationStats(n_prompt, 0, time.perf_counter() - t0, 0.0, "cancelled"))
        t1 = time.perf_counter()

        def choose(logits: np.ndarray) -> int:
            if greedy:
                return int(np.argmax(logits))
            return chain_distribution(logits, settings.temperature, settings.top_p).sample(rng)

        def dist(logits: np.ndarray) -> Distribution:
            return chain_distribution(logits, settings.temperature, settings.top_p)

        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        out: list[int] = target.last_completion_tokens
        parts: list[str] = []
        stops, tools_on = target.stop_ids, bool(keep)
        reason: StopReason | None = None
        drafted = accepted = 0

        def emit(token: int) -> bool:
            """Add a produced token; True when generation ends with it."""
            nonlocal reason
            if token in stops or _lc.llama_vocab_is_eog(target._vocab, token):
                target.last_stop_token = token
                reason = "tool_call" if tools_on and token == target.eom_id else "stop"
                return True
            out.append(token)
            text = decoder.decode(target.piece(token, special=token in keep))
            if text:
                parts.append(text)
                if on_text is not None:
                    on_text(text)
            if len(out) >= max_new:
                reason = "length"
                return True
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                return True
            return False

        plain, spec = self._plain, _Clock()
        warmup = WARMUP_PLAIN if self.adaptive and not plain.value else 0
        # a streaming target's pass costs far more than the draft's tokens: losing probes are cheap, so re-probe sooner
        streaming = target.streamer is not None
        first_backoff = STREAMING_BACKOFF if streaming else FIRST_BACKOFF
        plain_left, backoff, probe, probe_accepted = warmup, first_backoff, 0, 0
        pending = choose(self._logits(target, -1))
        try:
            done = emit(pending)
            while not done:
                room = min(max_new - len(out) - 1, target.n_ctx - len(target._cached) - 2,
                           draft.n_ctx - len(target._cached) - 2)
                started = time.perf_counter()
                if plain_left > 0 or room < 1 or not can_draft:
                    self._decode(target, [pending])
                    pending = choose(self._logits(target, -1))
                    plain.add(time.perf_counter() - started, 1)
                    plain_left -= 1
                    done = emit(pending)
                    continue
                k = min(self.k, room)
                base = len(target._cached)
                self._sync_draft(target._cached + [pending])
                tokens: list[int] = []
                qs: list[Distribution] = []
                for i in range(k):
                    logits = self._logits(draft, -1)
                    if greedy:
                        tokens.append(int(np.argmax(logits)))
                    else:
                        qs.append(dist(logits))
                        tokens.append(qs[-1].sample(rng))
                    if i + 1 < k:
                        self._decode(draft, [tokens[-1]])
                rows = self._verify_batch([pending, *tokens])
                nxt: int | None
                if greedy:
                    n, nxt = verify_greedy(tokens, [greedy_choice(r, TIE_MARGIN) for r in rows])
                else:
                    n, nxt = verify(tokens, qs, [dist(r) for r in rows], rng)
                keep_kv = base + 1 + n if nxt is not None else base + n  # a near-tie: redo its last token alone
                self._trim(target, keep_kv)
                self._trim(draft, keep_kv)
                drafted += k
                accepted += n
                spec.add(time.perf_counter() - started, n + (nxt is not None))
                self.k = min(self.draft_max, 2 * self.k) if n == k else max(1, n + 1)
                for token in tokens[:n] if nxt is None else (*tokens[:n], nxt):
                    done = emit(token)
                    if done:
                        break
                if nxt is None:
                    pending = tokens[n - 1] if n else pending
                    plain_left = max(plain_left, 1)
                else:
                    pending = nxt
                probe += 1
                probe_accepted += n
                if self.adaptive and probe >= PROBE_STEPS:
                    if probe_accepted == 0 or (plain.value and spec.value > plain.value):
                        plain_left, backoff = backoff, min(4 * backoff, MAX_BACKOFF)
                        spec = _Clock()
                        self.k = 1
                        self.losses += 1
                        if self.losses >= RELEASE_AFTER_LOSSES and streaming:
                            self.release()
                            can_draft = False
                    else:
                        backoff, self.losses = first_backoff, 0
                    probe = probe_accepted = 0
        finally:
            limit = n_prompt + len(out)
            self._trim(target, limit)
            if not self.released:
                self._trim(draft, limit)
        tail = decoder.decode(b"", final=True)
        if tail:
            parts.append(tail)
            if on_text is not None:
                on_text(tail)
        self.total_drafted += drafted
        self.total_accepted += accepted
        t2 = time.perf_counter()
        stats = GenerationStats(n_prompt, len(out), t1 - t0, t2 - t1, reason or "length", drafted, accepted)
        return Generation("".join(parts), stats)

