"""What each quant type costs in quality, measured on a trained miniature Llama: size, bits/weight, Δppl, KLD.

    python -m bench.bench_quality [--model base] [--types Q8_0,Q4_K_M,...] [--chunks 8] [--ctx 512]
                                  [--threads 1] [--write offload/quality_measured.json]

Everything runs through corral's own commands, as a user would: `corral imatrix` on the BF16 model with the built-in
calibration text, `corral quantize` to every type (with and without the importance matrix where the type works
without one), `corral eval --base BF16` on the built-in held-out text. `--write` stores the table where
`corral plan --best-quant` reads it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from corral.convert import quant_types
from corral.convert.gguf_file import read_gguf

TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_XXS", "Q2_K", "IQ2_M", "IQ2_XS", "IQ2_XXS",
         "IQ1_M", "IQ1_S")


def corral(*args: str) -> str:
    """Run one corral command; its stdout (a failure stops the benchmark with the command's error)."""
    proc = subprocess.run([sys.executable, "-m", "corral.app.cli.main", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"corral {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return proc.stdout


def bits_per_weight(path: Path) -> tuple[float, float]:
    """(whole file, the repeating layers' `blk.*` tensors): on a miniature model the 128256-row embedding and
    output dominate the file; the layers' figure is the one that carries over to a 405B."""
    model = read_gguf(path)
    layers = [t for t in model.tensors if t.name.startswith("blk.")]
    n_layers = sum(math.prod(t.shape) for t in layers)
    return model.tensor_bytes * 8 / model.n_parameters, sum(t.nbytes for t in layers) * 8 / n_layers


def measure(quant: Path, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = json.loads(corral("eval", str(quant), "--base", str(base), "--ctx", str(args.ctx), "--chunks",
                            str(args.chunks), "--threads", str(args.threads), "--json"))
    bpw, layer_bpw = bits_per_weight(quant)
    return {"file_bytes": quant.stat().st_size, "bpw": round(bpw, 3), "layer_bpw": round(layer_bpw, 3),
            "ppl": out["ppl"],
            "base_ppl": out["ppl_base"], "delta_ppl": out["delta_ppl"],
            "delta_ppl_percent": 100 * out["delta_ppl"] / out["ppl_base"], "kld_mean": out["kld_mean"],
            "kld_mean_stderr": out["kld_mean_stderr"], "kld_p99": out["kld_p99"], "top1": out["top1_agreement"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base", help="a trained model name (tests.helpers.trained)")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--imatrix-chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", type=Path, help="store the table as JSON here (for corral plan --best-quant)")
    args = parser.parse_args(argv)
    from tests.helpers.trained import MODELS, trained_gguf

    base = trained_gguf(args.model, "bf16")
    shape = MODELS[args.model].shape
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="corral-quality-") as tmp:
        imat = Path(tmp) / "imatrix.gguf"
        corral("imatrix", str(base), "-o", str(imat), "--ctx", str(args.ctx), "--chunks", str(args.imatrix_chunks),
               "--threads", str(args.threads))
        for name in args.types.split(","):
            info = quant_types.file_type(name)
            for with_imatrix in ((True,) if info.needs_imatrix else (False, True)):
                out = Path(tmp) / f"{name}{'-imat' if with_imatrix else ''}.gguf"
                extra = ["--imatrix", str(imat)] if with_imatrix else []
                corral("quantize", str(base), str(out), "--type", name, "--threads", str(args.threads), *extra)
                row = {"type": info.name, "imatrix": with_imatrix, **measure(out, base, args)}
                rows.append(row)
                print(f"{info.name:8} {'imatrix' if with_imatrix else '       '} {row['bpw']:6.2f} bpw  "
                      f"Δppl {row['delta_ppl_percent']:+7.2f}%  KLD {row['kld_mean']:.5f}  top-1 {row['top1']:.1%}",
                      file=sys.stderr)
                out.unlink()
    result = {"benchmark": "quality", "model": f"trained miniature Llama ({args.model}: {shape.n_layer} layers, "
                                              f"{shape.n_embd} wide, FFN {shape.n_ff}, 128256-token vocabulary)",
              "text": "corral's built-in held-out text", "n_ctx": args.ctx, "chunks": args.chunks,
              "imatrix": f"corral imatrix, built-in calibration text, {args.imatrix_chunks} chunks of {args.ctx}",
              "machine": platform.machine(), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    if args.write is not None:
        args.write.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    """The Markdown table BENCHMARKS.md and README show."""
    lines = ["| type | imatrix | bits/weight: layers / file | Δppl | mean KLD | top-1 agreement |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['layer_bpw']:.2f} / {r['bpw']:.2f} | "
                     f"{r['delta_ppl_percent']:+.2f}% | {r['kld_mean']:.4f} | {r['top1']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    res = main()
    print(table(res))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    assert all(math.isfinite(r["kld_mean"]) for r in res["rows"])
