"""Perplexity over a text, and KL divergence from a base model: what `llama-perplexity [--kl-divergence]` reports.

Chunks of `n_ctx` tokens (see `chunks`); in each, the logits at positions n_ctx/2 .. n_ctx-2 are scored against
the next token. With a base model the work takes two passes so that only one model is ever in memory (a 405B
base and its quant could not be loaded together): the base runs first and its log-probabilities go to an unnamed
temporary file in compact form (2 bytes per vocabulary entry and token, the way llama-perplexity stores them);
then the model runs over the same tokens and each of its distributions is compared with the stored one.
A cancel event stops either pass between batches: what was scored so far is returned, marked incomplete.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from corral.app.runtime import scoring
from corral.app.runtime.chunks import Chunks, decode_chunk, text_chunks
from corral.app.runtime.engine import LlamaEngine, load_engine
from corral.app.runtime.native import LOG, init_backend
from corral.app.runtime.native import lc as _lc
from corral.app.runtime.setup import EngineOptions, last_log_line, resolve_model_path
from corral.app.runtime.texts import CHUNK_TOKENS
from corral.app.runtime.vocab import Vocab
from corral.convert.errors import Cancelled, EngineError, InsufficientDisk, UsageError
from corral.convert.progress import ProgressFn, no_progress
from corral.convert.units import format_bytes

ROWS_PER_BLOCK = 32  # rows of logits handled at once (bounds the temporaries at a few hundred MB for 128k vocab)
DISK_MARGIN = 64 * 1024 * 1024

Loader = Callable[[Path, EngineOptions], LlamaEngine]


@dataclass(frozen=True)
class KLStats:
    """The model's token distributions against the base's over the same tokens."""

    mean: scoring.Estimate  # KL(base ‖ model), nats per token
    median: float
    p99: float
    maximum: float
    top1: scoring.Estimate  # share of tokens where both models' most likely token is the same
    ppl_base: scoring.Estimate
    delta_ppl: scoring.Estimate  # ppl(model) − ppl(base)

    def to_json(self) -> dict[str, Any]:
        return {
            "kld_mean": self.mean.value, "kld_mean_stderr": self.mean.stderr,
            "kld_median": self.median, "kld_p99": self.p99, "kld_max": self.maximum,
            "top1_agreement": self.top1.value, "top1_agreement_stderr": self.top1.stderr,
            "ppl_base": self.ppl_base.value, "ppl_base_stderr": self.ppl_base.stderr,
            "delta_ppl": self.delta_ppl.value, "delta_ppl_stderr": self.delta_ppl.stderr,
        }


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation measured (possibly over fewer chunks than planned when it was interrupted)."""

    model: str
    base: str | None
    n_ctx: int
    chunks: int  # chunks the run was to score
    chunks_scored: int  # chunks the model was scored on
    tokens_scored: int
    complete: bool
    ppl: scoring.Estimate | None  # None when no chunk of the model was scored
    kld: KLStats | None = None  # with a base, once at least one chunk of the model was compared
    note: str = ""  # why a number is missing
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "base": self.base, "n_ctx": self.n_ctx, "chunks": self.chunks,
            "chunks_scored": self.chunks_scored, "tokens_scored": self.tokens_scored, "complete": self.complete,
            "ppl": self.ppl.value if self.ppl else None, "ppl_stderr": self.ppl.stderr if self.ppl else None,
        }
        if self.base is not None:
            out.update(KLStats.to_json(self.kld) if self.kld else {"kld_mean": None})
        if self.note:
            out["note"] = self.note
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class _Pass:
    """Per-token numbers gathered while one model runs (plain lists; concatenated at the end)."""

    nll: list[np.ndarray] = field(default_factory=list)
    top: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    scale: list[np.ndarray] = field(default_factory=list)
    offset: list[np.ndarray] = field(default_factory=list)
    rest: list[np.ndarray] = field(default_factory=list)

    @property
    def chunks(self) -> int:
        return len(self.nll)

    def joined(self, name: str) -> np.ndarray:
        return np.concatenate(getattr(self, name)) if getattr(self, name) else np.empty(0)


def evaluate(model: str | Path, text: str, *, n_ctx: int = CHUNK_TOKENS, chunks: int | None = None,
             base: str | Path | None = None, options: EngineOptions | None = None, load: Loader | None = None,
             progress: ProgressFn = no_progress, cancel: threading.Event | None = None,
             work_dir: str | Path | None = None) -> EvalResult:
    """Perplexity of `model` over `text` (chunks of `n_ctx`, at most `chunks`); with `base`, KL divergence too.

    `load(path, options)` loads a model (default: `load_engine`); `work_dir` holds the base's log-probabilities
    (default: the system's temporary folder). Setting `cancel` returns what was scored so far (complete=False).
    """
    started = time.monotonic()
    model_path = resolve_model_path(model)
    base_path = resolve_model_path(base) if base is not None else None
    tokens, n_vocab = tokenize_text(model_path, text)
    if base_path is not None and tokenize_text(base_path, text) != (tokens, n_vocab):
        _check_vocabularies(model_path, base_path)
        raise UsageError(f"{model_path.name} and the base {base_path.name} tokenize the text differently: "
                         "different vocabularies cannot be compared")
    if len(tokens) < n_ctx:
        raise UsageError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; "
                         "give a longer text or a smaller --ctx")
    count = len(tokens) // n_ctx if chunks is None else min(len(tokens) // n_ctx, chunks)
    if base_path is not None:
        _check_space(count, n_ctx, n_vocab, work_dir)
    opts = replace(options or EngineOptions(), n_ctx=n_ctx, draft=None)
    if load is None:
        def load(path: Path, o: EngineOptions) -> LlamaEngine:
            return load_engine(path, o, cancel=cancel)

    head = {"model": str(model_path), "base": str(base_path) if base_path else None, "n_ctx": n_ctx}
    if base_path is None:
        with _loaded(load, model_path, opts) as engine:
            plan = text_chunks(engine, text, n_ctx, chunks)
            scored = _run(engine, plan, plan.count, None, progress, "", cancel)
        return _result(head, plan.count, scored, None, started)

    with tempfile.TemporaryFile(dir=work_dir, prefix="corral-eval-") as store:
        with _loaded(load, base_path, opts) as engine:
            plan = text_chunks(engine, text, n_ctx, chunks)
            base_pass = _run(engine, plan, 2 * plan.count, store, progress, "base", cancel)
        if base_pass.chunks < plan.count:
            return _no_kld(head, plan.count, started, f"interrupted while scoring the base ({base_pass.chunks} of "
                                                      f"{plan.count} chunks): no KL divergence")
        try:
            if cancel is not None and cancel.is_set():
                raise Cancelled("interrupted")
            with _loaded(load, model_path, opts) as engine:
                mine = text_chunks(engine, text, n_ctx, chunks)
                if mine.tokens != plan.tokens or _n_vocab(engine) != n_vocab:
                    raise UsageError(f"{model_path.name} and the base {base_path.name} tokenize the text "
                                     "differently: different vocabularies cannot be compared")
                scored = _run(engine, plan, 2 * plan.count, None, progress, "model", cancel,
                              base=(store, base_pass), done_before=plan.count)
        except Cancelled:
            if cancel is None or not cancel.is_set():
                raise
            return _no_kld(head, plan.count, started, "interrupted before the model ran: no KL divergence")
    return _result(head, plan.count, scored, base_pass, started)


def _no_kld(head: dict[str, Any], count: int, started: float, note: str) -> EvalResult:
    return EvalResult(**head, chunks=count, chunks_scored=0, tokens_scored=0, complete=False, ppl=None, note=note,
                      seconds=time.monotonic() - started)


def _scored_per_chunk(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


def _n_vocab(engine: LlamaEngine) -> int:
    return int(_lc.llama_vocab_n_tokens(engine._vocab))


@contextmanager
def _loaded(load: Loader, path: Path, options: EngineOptions) -> Iterator[LlamaEngine]:
    """A model loaded for the block and freed after it, even on error."""
    engine = load(path, options)
    try:
        yield engine
    finally:
        engine.close()


def tokenize_text(path: Path, text: str) -> tuple[list[int], int]:
    """`text` as the model at `path` tokenizes it for scoring (BOS first when it asks for one), and the size of
    its vocabulary; only the vocabulary is loaded, so this is quick even for a 405B file."""
    init_backend()
    LOG.install()
    params = _lc.llama_model_default_params()
    params.vocab_only = True
    with LOG.collect() as log:
        model = _lc.llama_model_load_from_file(str(path).encode("utf-8"), params)
    if not model:
        raise EngineError(f"llama.cpp could not read the vocabulary: {last_log_line(log) or 'see --verbose'}",
                          path=path)
    try:
        vocab = _lc.llama_model_get_vocab(model)
        tokens = Vocab(vocab).tokenize(text, add_special=bool(_lc.llama_vocab_get_add_bos(vocab)),
                                       parse_special=False)
        return tokens, int(_lc.llama_vocab_n_tokens(vocab))
    finally:
        _lc.llama_model_free(model)


def _check_vocabularies(model: Path, base: Path) -> None:
    from corral.app.runtime.draft import incompatibility
    from corral.convert.gguf_file import read_gguf

    why = incompatibility(read_gguf(base), read_gguf(model))
    if why is not None:
        raise UsageError(f"{model.name} cannot be compared with the base {base.name}: different vocabularies "
                         f"({why.replace('the target', 'the base')})")


def _check_space(count: int, n_ctx: int, n_vocab: int, work_dir: str | Path | None) -> None:
    need = count * _scored_per_chunk(n_ctx) * n_vocab * 2
    folder = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())
    free = shutil.disk_usage(folder).free
    if free < need + DISK_MARGIN:
        raise InsufficientDisk(f"the base's log-probabilities for {count} chunks need {format_bytes(need)} of "
                               f"temporary space in {folder}, {format_bytes(free)} is free: point TMPDIR at a "
                               "larger disk or score fewer --chunks", path=None)


def _run(engine: LlamaEngine, plan: Chunks, total: int, store: IO[bytes] | None, progress: ProgressFn, what: str,
         cancel: threading.Event | None, *, base: tuple[IO[bytes], _Pass] | None = None,
         done_before: int = 0) -> _Pass:
    """Score the chunks in order; with `store` write the compact log-probabilities there, with `base` compare."""
    first = plan.n_ctx // 2
    rows = _scored_per_chunk(plan.n_ctx)
    out = _Pass()
    progress(done_before, total, what)
    for i in range(plan.count):
        if cancel is not None and cancel.is_set():
            break
        tokens = plan.chunk(i, engine.bos_id)
        try:
            logits = decode_chunk(engine, tokens, first, cancel)[:rows]
        except Cancelled:
            break
        targets = np.asarray(tokens[first + 1:], dtype=np.int64)
        nll, kld = [], []
        for k, start in enumerate(range(0, rows, ROWS_PER_BLOCK)):
            block = logits[start:start + ROWS_PER_BLOCK]
            norms = scoring.row_norms(block)
            nll.append(scoring.token_nll(block, targets[start:start + ROWS_PER_BLOCK], norms))
            if store is not None:
                encoded = scoring.encode_log_probs(block, norms)
                encoded.codes.tofile(store)
                out.scale.append(encoded.scale)
                out.offset.append(encoded.offset)
                out.rest.append(encoded.rest)
            if base is not None:
                kld.append(scoring.kl_divergence(_stored(base, i, k, rows, block.shape), block, norms))
        out.nll.append(np.concatenate(nll))
        out.top.append(np.argmax(logits, axis=1))
        if base is not None:
            out.kld.append(np.concatenate(kld))
        progress(done_before + i + 1, total, what)
    return out


def _stored(base: tuple[IO[bytes], _Pass], chunk: int, block: int, rows: int,
            shape: tuple[int, ...]) -> scoring.EncodedLogProbs:
    """The base's log-probabilities for block `block` of chunk `chunk` (as `_run` wrote them)."""
    store, stored = base
    n, n_vocab = shape
    store.seek((chunk * rows + block * ROWS_PER_BLOCK) * n_vocab * 2)
    codes = np.fromfile(store, dtype=np.uint16, count=n * n_vocab).reshape(n, n_vocab)
    k = chunk * -(-rows // ROWS_PER_BLOCK) + block
    return scoring.EncodedLogProbs(codes, stored.scale[k], stored.offset[k], stored.rest[k])


def _result(head: dict[str, Any], count: int, scored: _Pass, base: _Pass | None, started: float) -> EvalResult:
    n = scored.chunks
    nll = scored.joined("nll")
    complete = n == count
    note = "" if complete else f"interrupted after {n} of {count} chunks"
    kld = None
    if base is not None and n:
        nll_base = base.joined("nll")[:len(nll)]  # the same tokens (the base scored every chunk)
        kl = scored.joined("kld")
        kld = KLStats(
            mean=scoring.mean(kl), median=scoring.percentile(kl, 50), p99=scoring.percentile(kl, 99),
            maximum=float(kl.max()), top1=scoring.fraction(scored.joined("top") == base.joined("top")[:len(nll)]),
            ppl_base=scoring.perplexity(nll_base), delta_ppl=scoring.delta_perplexity(nll, nll_base))
    elif base is not None:
        note = "interrupted before the model scored a chunk: no KL divergence"
    return EvalResult(**head, chunks=count, chunks_scored=n, tokens_scored=len(nll), complete=complete,
                      ppl=scoring.perplexity(nll) if n else None, kld=kld, note=note,
                      seconds=time.monotonic() - started)
