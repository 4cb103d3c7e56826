"""Predicted vs measured generation speed on this machine: `corral plan`'s tok/s against `corral ask`'s.

    python -m bench.bench_speed [--tokens 64] [--quick]

For miniature Llama models of several weight types and sizes (~100 MB to ~1 GB; random weights, with finite
scales, as `cpu_measure.fill_weights` writes them), built in a temp dir: plan with detected hardware in a fresh corral home
(so the CPU rates are measured, and the time that takes is reported), then load the model through the engine
with that plan and generate greedily, with 1 thread and with every core. Prints a markdown table with the
ratio predicted / measured, the load average during the run, and writes bench/out/bench_speed.json. Needs llama-cpp-python and the test extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from corral.convert.llama_family import LlamaHParams
from corral.offload import catalog

MiB = 1024**2



def _shape(name: str, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int) -> catalog.ModelShape:
    return catalog.ModelShape(name, LlamaHParams(n_embd, n_layer, n_head, n_head_kv, n_ff))


_MINI, _1K, _2K = _shape("mini", 256, 2, 8, 2, 512), _shape("m1k", 1024, 8, 16, 4, 4096), \
    _shape("m2k", 2048, 8, 16, 4, 8192)
MODELS = [("256x2", _MINI, "BF16"), ("1024x8", _1K, "BF16"), ("1024x8", _1K, "F16"), ("1024x8", _1K, "Q8_0"),
          ("1024x8", _1K, "Q4_K_M"), ("1024x8", _1K, "Q2_K"), ("2048x8", _2K, "Q4_K_M")]
QUICK = [MODELS[0], MODELS[4]]
RUN_BUDGET_S = 30.0  # generation seconds per model and thread count: no more runs after this


def measured_tps(path: Path, plan: Any, threads: int, tokens: int, runs: int) -> float:
    """tok/s of greedy generation through the engine with `plan` (what `corral ask` reports), best of `runs`
    (on a shared machine the best run is the one least disturbed by other processes)."""
    from corral.app.runtime.api import Message, SamplingSettings
    from corral.app.runtime.engine import load_engine
    from corral.app.runtime.setup import EngineOptions

    best = 0.0
    spent = 0.0
    with load_engine(path, EngineOptions(n_threads=threads), plan=plan) as engine:
        engine.generate([Message("user", "Hello there")], SamplingSettings(temperature=0.0, max_tokens=8))  # warm
        for i in range(runs):
            out = engine.generate([Message("user", f"Tell me story number {i}.")],
                                  SamplingSettings(temperature=0.0, max_tokens=tokens))
            best = max(best, out.stats.tokens_per_second)
            spent += out.stats.generation_seconds
            if spent > RUN_BUDGET_S:
                break
    return best


def main() -> int:
    from corral.convert.minimodel import MiniSpec, build_checkpoint
    from corral.offload.api import PlanOptions, plan_model
    from corral.offload.cpu_measure import fill_weights, measure_rates, plan_types
    from corral.offload.hardware import cpu_info, detect_hardware
    from corral.offload.profile import profile_from_gguf
    from tests.helpers.llama_ref import synth_gguf, tokenizer_kvs

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per run")
    ap.add_argument("--runs", type=int, default=3, help="generation runs per model (the best counts)")
    ap.add_argument("--quick", action="store_true", help="two models only")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        os.environ["CORRAL_HOME"] = str(tmp / "home")  # never the user's cache
        os.environ.pop("CORRAL_CPU_RATES", None)
        kvs = tokenizer_kvs(build_checkpoint(tmp / "ckpt", MiniSpec(), seed=0))
        load_start = os.getloadavg()[0]
        hw = detect_hardware(tmp, measure=False)
        _, cpu = cpu_info()
        cores = max(1, hw.cpu_cores)
        print(f"## generation speed: predicted (corral plan) vs measured (engine, greedy, {args.tokens} tokens)\n")
        print(f"{cpu}, {cores} cores; RAM read bandwidth measured again with each model's fresh home\n")
        print("| model | type | file MiB | threads | measured tok/s | predicted tok/s | ratio | RAM GB/s | "
              "rates measured in |")
        print("|---|---|---|---|---|---|---|---|---|")
        for label, shape, quant in QUICK if args.quick else MODELS:
            path = fill_weights(synth_gguf(tmp / f"{label}-{quant}.gguf", shape, quant, kvs))
            # a fresh home per model: its types are measured right before it runs (and the cost is shown)
            os.environ["CORRAL_HOME"] = str(tmp / f"home-{label}-{quant}")
            for threads in sorted({1, cores}):
                options = PlanOptions(n_ctx=1024, n_threads=threads)
                os.environ["CORRAL_CPU_RATES"] = "off"
                draft = plan_model(path, options)  # typical rates; tells which types run on the CPU
                os.environ.pop("CORRAL_CPU_RATES")
                t0 = time.perf_counter()  # what plan_model does the first time, timed alone (cached after)
                measure_rates(plan_types(profile_from_gguf(path), draft), cpu_name=hw.cpu_name, threads=cores,
                              use_extra_bufts=draft.use_extra_bufts)
                measure_s = time.perf_counter() - t0
                plan = plan_model(path, options)
                got = measured_tps(path, plan, threads, args.tokens, args.runs)
                row = {"model": label, "type": quant, "file_mib": path.stat().st_size / MiB, "threads": threads,
                       "measured": got, "predicted": plan.tokens_per_second, "plan_s": measure_s,
                       "warnings": list(plan.warnings), "load_avg": os.getloadavg()[0],
                       "seconds_by_tier": plan.time_per_token}
                rows.append(row)
                took = f"{measure_s:.1f} s" if measure_s > 0.1 else "(cached)"
                ram = plan.device("CPU").bandwidth / 1e9
                row["ram_bandwidth"] = ram * 1e9
                print(f"| {label} | {quant} | {row['file_mib']:.0f} | {threads} | {got:.1f} | "
                      f"{plan.tokens_per_second:.1f} | {plan.tokens_per_second / got:.2f} | {ram:.1f} | {took} |",
                      flush=True)
            path.unlink()
        ratios = [r["predicted"] / r["measured"] for r in rows if r["measured"] > 0]
        if ratios:
            print(f"\nratio predicted/measured: {min(ratios):.2f} .. {max(ratios):.2f}; "
                  f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
        measured_rates = {p.parent.parent.name: json.loads(p.read_text())
                          for p in tmp.glob("home-*/cache/cpu_rates.json")}
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_speed.json").write_text(json.dumps({"rows": rows, "cpu_rates": measured_rates}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
