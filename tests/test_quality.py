"""The measured quality table: shipped data, ordering, and how it steers `corral plan --best-quant`."""

from __future__ import annotations

import math

import pytest

from corral.offload import quality
from corral.offload.api import PlanOptions, best_quant
from tests.test_plan import machine


def _doc(**klds: float) -> dict:
    return {"rows": [{"type": q, "imatrix": True, "bpw": 4.0, "delta_ppl_percent": k * 100, "kld_mean": k,
                      "top1": 1 - k} for q, k in klds.items()]}


def test_shipped_table_is_complete_and_ordered_by_size() -> None:
    table = quality.measured()
    assert {"Q8_0", "Q6_K", "Q4_K_M", "IQ4_XS", "Q2_K", "IQ2_XXS", "IQ1_S"} <= set(table)
    for row in table.values():
        assert math.isfinite(row.kld_mean) and row.kld_mean > 0 and 0 < row.top1 <= 1 and row.bpw > 1
    # fewer bits lose more: the broad trend of the measurement, not a tie-breaking detail
    chain = ["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XXS", "IQ1_S"]
    klds = [table[q].kld_mean for q in chain]
    assert klds == sorted(klds), dict(zip(chain, klds))
    assert table["IQ1_S"].kld_mean > 10 * table["Q8_0"].kld_mean


def test_parse_keeps_the_better_row_per_type() -> None:
    def row(imatrix: bool, kld: float) -> dict:
        return {"type": "Q4_K_M", "imatrix": imatrix, "bpw": 4.9, "delta_ppl_percent": kld * 100, "kld_mean": kld,
                "top1": 0.9}

    assert quality.parse({"rows": [row(False, 0.02), row(True, 0.01)]})["Q4_K_M"].imatrix
    assert not quality.parse({"rows": [row(False, 0.01), row(True, 0.02)]})["Q4_K_M"].imatrix


def test_by_quality_orders_measured_types_and_keeps_unmeasured_in_place() -> None:
    table = quality.parse(_doc(Q4_K_M=0.03, IQ4_XS=0.02, Q2_K=0.2))
    assert quality.by_quality(["BF16", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K"], table) == \
        ["BF16", "IQ4_XS", "Q4_K_M", "Q3_K_M", "Q2_K"]
    assert quality.kld("bf16", table) == 0.0 and quality.kld("IQ1_M", table) is None


@pytest.mark.parametrize("better", ["IQ4_XS", "Q4_K_M"])
def test_best_quant_recommends_the_type_that_measured_better(monkeypatch: pytest.MonkeyPatch, better: str) -> None:
    worse = {"IQ4_XS": "Q4_K_M", "Q4_K_M": "IQ4_XS"}[better]
    table = quality.parse(_doc(**{better: 0.01, worse: 0.05, "Q5_K_M": 0.005, "Q3_K_M": 0.1}))
    monkeypatch.setattr(quality, "measured", lambda: table)
    # 70B on a CPU machine whose RAM holds the 4-bit types but not Q5_K_M: quality decides between the two
    rows, pick = best_quant("llama-3.1-70b", PlanOptions(n_ctx=2048), machine(ram_gib=48))
    ok = {r.quant for r in rows if r.plan.fits and not r.plan.disk_stream_bytes}
    assert {"IQ4_XS", "Q4_K_M"} <= ok and "Q5_K_M" not in ok
    assert pick == better
    names = [r.quant for r in rows]
    assert names.index(better) < names.index(worse)
    assert rows[names.index(better)].to_json()["quality"]["kld_mean"] == 0.01
