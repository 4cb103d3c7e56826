"""The sampler chain in numpy and the speculative sampling rule.

`chain_distribution` turns one row of logits into the distribution llama.cpp's chain (top-k 40, top-p,
min-p 0.05, temperature; see `LlamaEngine._sampler`) samples from, as a sparse (ids, probs) pair.
`verify` applies the rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023): drafted
token x with draft probability q(x) is kept with probability min(1, p(x)/q(x)); the first rejected one
is replaced by a sample from normalise(max(0, p - q)); when every drafted token is kept one more comes
from p. The tokens produced this way follow the target's distribution p exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOP_K = 40  # llama-cpp-python's create_chat_completion defaults, as in engine.py
MIN_P = 0.05


@dataclass(frozen=True)
class Distribution:
    """A sparse distribution over token ids (ids unique, probs summing to 1)."""

    ids: np.ndarray
    probs: np.ndarray

    def prob(self, token: int) -> float:
        hit = np.flatnonzero(self.ids == token)
        return float(self.probs[hit[0]]) if hit.size else 0.0

    def sample(self, rng: np.random.Generator) -> int:
        return int(self.ids[min(int(np.searchsorted(np.cumsum(self.probs), rng.random(), side="right")),
                                self.ids.size - 1)])


def chain_distribution(logits: np.ndarray, temperature: float, top_p: float) -> Distribution:
    """What llama.cpp's chain top-k(40) -> top-p -> min-p(0.05) -> temp leaves to sample from
    (temperature <= 0: the argmax alone)."""
    if temperature <= 0:
        return Distribution(np.array([int(np.argmax(logits))]), np.array([1.0]))
    k = min(TOP_K, logits.size)
    ids = np.argpartition(-logits, k - 1)[:k]
    order = np.lexsort((ids, -logits[ids]))  # descending logits, ties by id
    ids = ids[order]
    vals = logits[ids].astype(np.float64)
    if top_p < 1.0:
        probs = np.exp(vals - vals[0])
        probs /= probs.sum()
        cum = np.cumsum(probs)
        keep = int(np.searchsorted(cum, top_p, side="left")) + 1
        ids, vals = ids[:keep], vals[:keep]
    floor = vals[0] + np.log(MIN_P)
    keep = max(1, int(np.count_nonzero(vals >= floor)))
    ids, vals = ids[:keep], vals[:keep]
    scaled = vals / temperature
    probs = np.exp(scaled - scaled.max())
    return Distribution(ids, probs / probs.sum())


def residual(p: Distribution, q: Distribution) -> Distribution:
    """normalise(max(0, p - q)); p itself when that is empty (p == q)."""
    q_on_p = np.array([q.prob(int(t)) for t in p.ids])
    rest = np.maximum(p.probs - q_on_p, 0.0)
    total = rest.sum()
    if total <= 1e-12:
        return p
    keep = rest > 0
    return Distribution(p.ids[keep], rest[keep] / total)


def verify(drafted: Sequence[int], qs: Sequence[Distribution], ps: Sequence[Distribution],
           rng: np.random.Generator) -> tuple[int, int]:
    """(number of drafted tokens accepted, the token that follows them); `ps` has one more entry than
    `drafted` (the target's distribution after the last drafted token)."""
    for i, token in enumerate(drafted):
        p_x, q_x = ps[i].prob(token), qs[i].prob(token)
        if q_x > 0 and rng.random() * q_x < p_x:  # accept with probability min(1, p/q)
            continue
        return i, residual(ps[i], qs[i]).sample(rng)
    return len(drafted), ps[len(drafted)].sample(rng)


def greedy_choice(logits: np.ndarray, margin: float) -> tuple[int, bool]:
    """(argmax, whether it leads the runner-up by at least `margin`)."""
    best = int(np.argmax(logits))
    top = logits[best]
    logits[best] = -np.inf
    sure = bool(top - logits.max() >= margin)
    logits[best] = top
    return best, sure


def verify_greedy(drafted: Sequence[int], choices: Sequence[tuple[int, bool]]) -> tuple[int, int | None]:
    """Greedy: keep drafted tokens while they equal the target's argmax; then the target's own token, or None
    when the position that decides is a near-tie (`choices`: `greedy_choice` for each position)."""
    for i, token in enumerate(drafted):
        best, sure = choices[i]
        if not sure:
            return i, None
        if best != token:
            return i, best
    best, sure = choices[len(drafted)]
    return len(drafted), best if sure else None
