"""Decode speed with layers on llama.cpp RPC workers over loopback: local vs 1 and 2 workers, same model.

    python -m bench.bench_rpc [--hidden H] [--layers N] [--tokens N] [--threads N] [--repeat N]

Each configuration runs in its own process (ggml's device registry is process-wide); the workers are
`corral worker` processes on 127.0.0.1. Loopback has no wire: the numbers measure the protocol's per-token
cost (a graph sent and computed per worker per token, activations copied between them), not a network.
Every remote run is greedy and checked to give the local run's text. Last, one worker with `--cache`:
the load time of a first and a second client.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from corral.convert.units import format_bytes

OUT = Path(__file__).resolve().parent / "out" / "bench_rpc.json"
PROMPT = "Write a long story about a llama who learns to read."


def _client(*args: str) -> dict:
    from tests.helpers.rpc import REPO

    done = subprocess.run([sys.executable, "-m", "tests.helpers.rpc_client", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)

    from corral.app.runtime import rpc
    from tests.helpers.engine import write_tiny_gguf
    from tests.helpers.rpc import rpc_workers

    if not rpc.available():
        print("skipped: llama-cpp-python was built without GGML_RPC=on")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_tiny_gguf(folder / "bench.gguf", hidden=args.hidden, n_layers=args.layers,
                                n_heads=args.hidden // 64, n_kv_heads=max(1, args.hidden // 256),
                                ffn=args.hidden * 3, layer_dtype=np.float16)
        common = ["generate", str(model), PROMPT, "--max-tokens", str(args.tokens), "--threads", str(args.threads)]
        rows = []
        local = [_client(*common) for _ in range(args.repeat)]
        rows.append({"config": "local", "workers": 0, "tok_s": statistics.median(r["tok_s"] for r in local),
                     "load_s": statistics.median(r["load_s"] for r in local)})
        for n in (1, 2):
            with rpc_workers(n, folder, threads=args.threads) as workers:
                link = _client("probe", workers[0].endpoint)["link"]
                flags = [a for w in workers for a in ("--rpc", w.endpoint)]
                runs = [_client(*common, *flags) for _ in range(args.repeat)]
            if any(r["text"] != local[0]["text"] for r in runs):
                raise SystemExit(f"{n} worker(s): greedy text differs from the local run")
            rows.append({"config": f"{n} loopback worker{'s' if n > 1 else ''}", "workers": n,
                         "tok_s": statistics.median(r["tok_s"] for r in runs),
                         "load_s": statistics.median(r["load_s"] for r in runs),
                         "latency_us": link["latency_s"] * 1e6, "bandwidth": link["bandwidth"]})
        with rpc_workers(1, folder, threads=args.threads, extra=("--cache", str(folder / "rpc-cache"))) as workers:
            flags = ["--rpc", workers[0].endpoint]
            cold, warm = _client(*common, *flags), _client(*common, *flags)
        cache = {"first_load_s": cold["load_s"], "second_load_s": warm["load_s"]}
        size = model.stat().st_size
    print(f"model: {format_bytes(size)} F16 ({args.layers} layers, hidden {args.hidden}), {args.tokens} tokens, "
          f"{args.threads} thread(s) per process, median of {args.repeat}")
    print(f"{'config':<20} {'tok/s':>8} {'vs local':>9} {'load s':>8} {'RTT us':>8} {'link':>12}")
    base = rows[0]["tok_s"]
    for row in rows:
        link_text = f"{format_bytes(row['bandwidth'])}/s" if "bandwidth" in row else "-"
        rtt = f"{row['latency_us']:.0f}" if "latency_us" in row else "-"
        print(f"{row['config']:<20} {row['tok_s']:>8.1f} {row['tok_s'] / base:>8.2f}x {row['load_s']:>8.2f} "
              f"{rtt:>8} {link_text:>12}")
    print(f"worker tensor cache (--cache): first load {cache['first_load_s']:.2f} s, second load "
          f"{cache['second_load_s']:.2f} s (only tensors over ggml-rpc's 10 MiB threshold are cached)")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "model_bytes": size,
                               "args": vars(args), "rows": rows, "cache": cache}, indent=2))


if __name__ == "__main__":
    main()
