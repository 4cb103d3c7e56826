"""What a quant type costs in quality: corral's own measurements (bench/bench_quality.py), read from package data.

The numbers come from a trained miniature Llama (see BENCHMARKS.md): they rank the types against each other on
the same model and text; the absolute losses of a 405B are much smaller (large models quantize better), which is
why README shows the literature's figures beside them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

DATA_FILE = "quality_measured.json"
UNQUANTIZED = ("F32", "BF16", "F16")


@dataclass(frozen=True)
class MeasuredQuality:
    """One measured quant type (with the importance matrix when one was used)."""

    quant: str
    imatrix: bool
    bpw: float
    delta_ppl_percent: float
    kld_mean: float
    top1: float

    def to_json(self) -> dict[str, Any]:
        return {"imatrix": self.imatrix, "bpw_measured": self.bpw, "delta_ppl_percent": self.delta_ppl_percent,
                "kld_mean": self.kld_mean, "top1_agreement": self.top1}


def parse(doc: dict[str, Any]) -> dict[str, MeasuredQuality]:
    """The best measurement per type (with or without an importance matrix, whichever lost less)."""
    out: dict[str, MeasuredQuality] = {}
    for row in doc.get("rows", ()):
        q = MeasuredQuality(str(row["type"]), bool(row["imatrix"]), float(row["bpw"]),
                            float(row["delta_ppl_percent"]), float(row["kld_mean"]), float(row["top1"]))
        if q.quant not in out or q.kld_mean < out[q.quant].kld_mean:
            out[q.quant] = q
    return out


@functools.cache
def measured() -> dict[str, MeasuredQuality]:
    """The table shipped with corral (empty if it is missing)."""
    try:
        text = resources.files("corral.offload").joinpath(DATA_FILE).read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return {}
    return parse(json.loads(text))


def kld(quant: str, table: dict[str, MeasuredQuality] | None = None) -> float | None:
    """Mean KL divergence from the unquantized model (0 for unquantized types, None when not measured)."""
    if quant.upper() in UNQUANTIZED:
        return 0.0
    row = (measured() if table is None else table).get(quant.upper())
    return row.kld_mean if row else None


def by_quality(quants: list[str], table: dict[str, MeasuredQuality] | None = None) -> list[str]:
    """`quants` from the least to the most quality lost; an unmeasured type ranks with the worst measured one
    before it in the given order (the given order, most precise first, is the fallback)."""
    keyed = []
    worst = 0.0
    for i, q in enumerate(quants):
        score = kld(q, table)
        worst = max(worst, score) if score is not None else worst
        keyed.append((score if score is not None else worst, i, q))
    return [q for _, _, q in sorted(keyed)]
