"""The training loop: seeded, deterministic, two CPU threads; AdamW with warm-up and cosine decay.

Each step reads `batch` windows of `seq + 1` tokens at seeded random offsets of the training stream, the first token
of each replaced by BOS (what evaluation feeds too), and minimises the next-token cross-entropy over the reduced
vocabulary with the unseen class counted once per unseen id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .corpus import BOS_ID, Quality, Vocab, eval_windows, quality_from_logprobs, scored, train_tokens, vocab
from .model import Llama, Shape, class_log_softmax, init_weights

THREADS = 2


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a trained model's weights (part of its cache key)."""

    shape: Shape
    steps: int
    batch: int = 8
    seq: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0


def _setup() -> None:
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * frac))


def train(cfg: TrainConfig, voc: Vocab | None = None, tokens: np.ndarray | None = None) -> Llama:
    """Train a model on the reduced vocabulary of `voc` (default: the training text's) and return it."""
    _setup()
    voc = voc or vocab()
    stream = torch.from_numpy(voc.class_of()[train_tokens() if tokens is None else tokens])
    bos = int(voc.class_of()[BOS_ID])
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Llama(cfg.shape, voc.n_classes)
    init_weights(model, gen)
    decay = [p for p in model.parameters() if p.ndim > 1]
    keep = [p for p in model.parameters() if p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    offset = torch.zeros(voc.n_classes)
    offset[voc.unseen_class] = voc.log_n_unseen
    span = len(stream) - cfg.seq - 1
    model.train()
    for step in range(cfg.steps):
        starts = torch.randint(0, span, (cfg.batch,), generator=gen)
        rows = torch.stack([stream[s:s + cfg.seq + 1] for s in starts.tolist()])
        rows[:, 0] = bos
        logits = model(rows[:, :-1])
        loss = F.cross_entropy((logits + offset).reshape(-1, voc.n_classes), rows[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
    return model.eval()


@torch.no_grad()
def class_eval(model: Llama, voc: Vocab, tokens: np.ndarray, n_ctx: int) -> Quality:
    """Held-out quality of a reduced-vocabulary model, scored as llama-perplexity scores (see corpus.scored).

    Greedy accuracy compares ids: an argmax at the unseen class is, in the full vocabulary, a tie of all unseen
    ids, which argmax resolves to the lowest of them."""
    _setup()
    windows = eval_windows(tokens, n_ctx)
    first, targets = scored(windows)
    table = voc.class_of()
    logp = class_log_softmax(model(torch.from_numpy(table[windows])), voc)[:, first:-1]
    tgt = torch.from_numpy(table[targets])
    picked = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    best = logp.argmax(-1)
    seen_ids = torch.tensor([*voc.seen, voc.first_unseen])
    correct = seen_ids[best] == torch.from_numpy(targets)
    return quality_from_logprobs(picked.double().numpy(), correct.numpy())
