"""The trained models' tokens: the built-in texts through the real Llama 3 tokenizer, and the vocabulary they use.

Training and evaluation both follow llama-perplexity's convention: a window of the token stream whose first
token is replaced by BOS. Evaluation cuts the held-out text into consecutive windows of `n_ctx` tokens and scores
the predictions made from the second half of each window.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from corral.app.runtime.texts import eval_text, training_text
from corral.convert import llama3_tokenizer
from corral.convert.minimodel import VOCAB_SIZE

BOS_ID = 128000


@functools.cache
def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    return Tokenizer.from_str(llama3_tokenizer.tokenizer_json())


def tokenize(text: str) -> np.ndarray:
    """`text` as Llama 3 tokenizes it, BOS first (the tokenizer's post-processor adds it, as Llama 3 does)."""
    ids = _tokenizer().encode(text, add_special_tokens=True).ids
    return np.asarray(ids, dtype=np.int64)


@functools.cache
def train_tokens() -> np.ndarray:
    return tokenize(training_text())


@functools.cache
def eval_tokens() -> np.ndarray:
    return tokenize(eval_text())


@dataclass(frozen=True)
class Vocab:
    """The ids the training text uses (and BOS), in id order, plus one class for every other id."""

    seen: tuple[int, ...]

    @property
    def n_classes(self) -> int:
        return len(self.seen) + 1

    @property
    def unseen_class(self) -> int:
        return len(self.seen)

    @property
    def n_unseen(self) -> int:
        return VOCAB_SIZE - len(self.seen)

    @property
    def log_n_unseen(self) -> float:
        return math.log(self.n_unseen)

    @property
    def first_unseen(self) -> int:
        return next(i for i, s in enumerate((*self.seen, VOCAB_SIZE)) if i != s)

    def class_of(self) -> np.ndarray:
        """[VOCAB_SIZE] -> class index (every unseen id -> the unseen class)."""
        table = np.full(VOCAB_SIZE, self.unseen_class, dtype=np.int64)
        table[list(self.seen)] = np.arange(len(self.seen))
        return table


@functools.cache
def vocab() -> Vocab:
    return Vocab(tuple(sorted({*train_tokens().tolist(), BOS_ID})))


def eval_windows(tokens: np.ndarray, n_ctx: int) -> np.ndarray:
    """[n, n_ctx] consecutive windows of `tokens` (the tail that does not fill one dropped), each starting with BOS."""
    n = len(tokens) // n_ctx
    windows = tokens[: n * n_ctx].reshape(n, n_ctx).copy()
    windows[:, 0] = BOS_ID
    return windows


def scored(windows: np.ndarray) -> tuple[int, np.ndarray]:
    """(first position whose prediction is scored, the targets [n, n_ctx - 1 - first]) of llama-perplexity."""
    first = windows.shape[1] // 2
    return first, windows[:, first + 1:]


@dataclass(frozen=True)
class Quality:
    """Held-out next-token quality: greedy accuracy and perplexity over the scored tokens."""

    accuracy: float
    ppl: float
    tokens: int


def unigram_quality(n_ctx: int) -> Quality:
    """The training text's unigram distribution (add-one smoothing over the whole vocabulary) on the held-out text."""
    counts = Counter(train_tokens().tolist())
    total = sum(counts.values())
    _, targets = scored(eval_windows(eval_tokens(), n_ctx))
    flat = targets.reshape(-1)
    logp = np.log(np.array([counts.get(int(t), 0) + 1 for t in flat], dtype=np.float64) / (total + VOCAB_SIZE))
    top = counts.most_common(1)[0][0]
    return Quality(float(np.mean(flat == top)), float(math.exp(-logp.mean())), int(flat.size))


def quality_from_logprobs(logp_targets: np.ndarray, correct: np.ndarray) -> Quality:
    """Quality from the log-probabilities of the scored targets and whether each argmax was the target."""
    return Quality(float(np.mean(correct)), float(math.exp(-float(np.mean(logp_targets)))), int(logp_targets.size))
