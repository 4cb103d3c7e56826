"""The numbers behind `corral eval`, from logits (numpy only).

The definitions are llama-perplexity's: the negative log-likelihood of each scored token, perplexity as
exp(mean NLL) with the standard error of the mean carried through exp, and for `--kl-divergence` the base model's
log-probabilities stored in a compact form (per token: a scale and an offset, then one uint16 per vocabulary entry
over a range of at most 16 nats below the top logit) against which the model's distribution is compared. Unlike
llama-perplexity, the entries below that range are not dropped from the KL sum but counted as one outcome.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_PROB_RANGE = 16.0  # nats below the top logit that the compact form keeps (llama-perplexity's choice)
CODE_MAX = 65535


@dataclass(frozen=True)
class EncodedLogProbs:
    """Log-probabilities of some rows in compact form: log p[v] = scale * codes[v] + offset where codes[v] > 0;
    the entries with code 0 (the far tail) are kept only as their total probability, `rest`."""

    codes: np.ndarray  # uint16 [rows, n_vocab]
    scale: np.ndarray  # float32 [rows]
    offset: np.ndarray  # float32 [rows] (the log-probability code 0 stands for)
    rest: np.ndarray  # float64 [rows]: the probability of the entries with code 0


Norms = tuple[np.ndarray, np.ndarray]
"""Per row: the top logit (float32) and log Σ exp(logit − top) (float64): log softmax = logit − top − lse."""


def row_norms(logits: np.ndarray) -> Norms:
    """The top logit and log Σ exp(logit − top) of each row (the sum in float64)."""
    top = logits.max(axis=1)
    total = np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64)
    return top, np.log(total)


def token_nll(logits: np.ndarray, targets: np.ndarray, norms: Norms | None = None) -> np.ndarray:
    """−log softmax(logits[i])[targets[i]] for each row, float64."""
    top, lse = norms or row_norms(logits)
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)
    return top.astype(np.float64) + lse - picked


def encode_log_probs(logits: np.ndarray, norms: Norms | None = None) -> EncodedLogProbs:
    """The compact form of log softmax(logits) per row (logits more than 16 below the top become code 0)."""
    top, lse = norms or row_norms(logits)
    low = np.maximum(logits.min(axis=1), top - np.float32(LOG_PROB_RANGE))
    scale = ((top - low) / np.float32(CODE_MAX)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # a flat row: every code is 0
    offset = (low - top - lse).astype(np.float32)
    codes = np.rint((logits - low[:, None]) / scale[:, None])
    codes = np.where(logits > low[:, None], np.clip(codes, 0, CODE_MAX), 0).astype(np.uint16)
    tail = np.where(codes == 0, np.exp(logits - (top + lse.astype(np.float32))[:, None]), np.float32(0.0))
    return EncodedLogProbs(codes, scale, offset, tail.sum(axis=1, dtype=np.float64))


def kl_divergence(base: EncodedLogProbs, logits: np.ndarray, norms: Norms | None = None) -> np.ndarray:
    """KL(base ‖ model) per row in nats, float64: Σ_v p_base(v) (log p_base(v) − log p_model(v)).

    The stored entries are renormalised so that with the tail they sum to 1 (the rounding of the codes then adds
    no bias), and the tail counts as one outcome: its probability under both models (so the result is ≥ 0).
    """
    top, lse = norms or row_norms(logits)
    kept = base.codes > 0
    log_base = base.codes.astype(np.float32) * base.scale[:, None] + base.offset[:, None]
    mass = np.where(kept, np.exp(log_base), np.float32(0.0)).sum(axis=1, dtype=np.float64)
    fix = np.log(np.clip(1.0 - base.rest, 1e-300, None) / np.clip(mass, 1e-300, None)).astype(np.float32)
    log_base += fix[:, None]
    log_model = logits - (top + lse.astype(np.float32))[:, None]
    terms = np.where(kept, np.exp(log_base) * (log_base - log_model), np.float32(0.0)).sum(axis=1, dtype=np.float64)
    model_rest = np.where(kept, np.float32(0.0), np.exp(log_model)).sum(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(base.rest > 0, base.rest * np.log(base.rest / np.clip(model_rest, 1e-300, None)), 0.0)
    return terms + tail


@dataclass(frozen=True)
class Estimate:
    """A mean over tokens and its standard error."""

    value: float
    stderr: float


def perplexity(nll: np.ndarray) -> Estimate:
    """exp(mean NLL), with llama-perplexity's error: ppl × the standard error of the mean NLL."""
    n = len(nll)
    mean = float(np.mean(nll))
    ppl = math.exp(mean)
    return Estimate(ppl, ppl * _sem(nll) if n > 1 else 0.0)


def _sem(values: np.ndarray) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    var = float(np.mean(np.square(values, dtype=np.float64)) - np.mean(values, dtype=np.float64) ** 2)
    return math.sqrt(max(var, 0.0) / (n - 1))


def mean(values: np.ndarray) -> Estimate:
    return Estimate(float(np.mean(values, dtype=np.float64)), _sem(values))


def fraction(hits: np.ndarray) -> Estimate:
    """The share of true values, with the binomial standard error."""
    n = len(hits)
    p = float(np.mean(hits)) if n else 0.0
    return Estimate(p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)


def delta_perplexity(nll_model: np.ndarray, nll_base: np.ndarray) -> Estimate:
    """ppl(model) − ppl(base) over the same tokens; the error propagates both means and their covariance."""
    n = len(nll_model)
    ppl_model, ppl_base = math.exp(float(np.mean(nll_model))), math.exp(float(np.mean(nll_base)))
    if n < 2:
        return Estimate(ppl_model - ppl_base, 0.0)
    cov = np.cov(np.stack([nll_model, nll_base]).astype(np.float64), bias=True) / (n - 1)
    var = ppl_model ** 2 * cov[0, 0] + ppl_base ** 2 * cov[1, 1] - 2 * ppl_model * ppl_base * cov[0, 1]
    return Estimate(ppl_model - ppl_base, math.sqrt(max(float(var), 0.0)))


def percentile(values: np.ndarray, q: float) -> float:
    """The q-th percentile (0..100), linear between ranks as llama-perplexity computes it."""
    return float(np.percentile(values, q)) if len(values) else math.nan
