"""Generation speed of corral's engine against raw llama-cpp-python on the same file and threads.

    python -m bench.bench_ask [--quick] [--threads N] [--tokens N] [--repeat N] [--big-hidden H]

For each model file, both sides generate greedily from the same chat prompt (so they produce
the same tokens). Per-token time = (wall time for N tokens - wall time for 1 token) / (N - 1),
which cancels prompt processing and fixed costs the same way on both sides; runs alternate
between the sides and the median is reported. References:
  * `create_chat_completion(stream=True)` -- what a llama-cpp-python user calls;
  * `Llama.generate` -- the raw token generator (sampling + decode, no detokenization).
Models: the tiny test model (Python overhead per token is most visible there) and a ~1 GB Q8_0
file converted by corral from a larger miniature checkpoint (realistic per-token cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llama_cpp import Llama

from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.engine import load_engine

MESSAGES = [Message("system", "You are a helpful assistant."), Message("user", "Write a long story about a llama.")]
CHAT = [{"role": m.role, "content": m.content} for m in MESSAGES]


def _tiny(folder: Path) -> Path:
    from tests.helpers.engine import write_tiny_gguf

    return write_tiny_gguf(folder / "tiny.gguf")


def _big(folder: Path, hidden: int) -> Path:
    from corral.convert.converter import convert_checkpoint
    from corral.convert.minimodel import MiniSpec, build_checkpoint

    spec = MiniSpec(n_embd=hidden, n_layer=8, n_head=hidden // 128, n_head_kv=max(1, hidden // 512),
                    n_ff=int(hidden * 2.75) // 256 * 256, shards=2)
    ckpt = build_checkpoint(folder / "big-ckpt", spec, seed=1)
    out = folder / "big-q8_0.gguf"
    convert_checkpoint(ckpt, out, outtype="q8_0")
    for f in ckpt.iterdir():
        f.unlink()
    return out


def _timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bench_file(path: Path, threads: int, n_tokens: int, repeat: int) -> dict[str, dict[str, float]]:
    """tokens/s (wall and CPU-time based) per side, and the per-round paired ratios corral / side."""
    from tests.helpers.plans import make_plan

    plan = make_plan(n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, n_batch=512)
    engine = load_engine(path, plan=plan)
    ref = Llama(model_path=str(path), verbose=False, **engine.llama_kwargs)
    prompt = engine.prompt_tokens(MESSAGES)
    sink: list[str] = []

    def ours(n: int) -> None:
        g = engine.generate(MESSAGES, SamplingSettings(temperature=0, max_tokens=n), on_text=sink.append)
        assert g.stats.completion_tokens == n, g.stats

    def chat(n: int) -> None:
        for _ in ref.create_chat_completion(CHAT, temperature=0, max_tokens=n, stream=True):
            pass

    def raw(n: int) -> None:
        for i, _tok in enumerate(ref.generate(prompt, temp=0)):
            if i + 1 >= n:
                break

    sides = {"corral": ours, "create_chat_completion": chat, "Llama.generate": raw}
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for fn in sides.values():  # warm up (page cache, graph allocation)
        fn(2)
    for r in range(repeat):
        order = list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))
        for name, fn in order:
            long_w, long_c = _timed(lambda fn=fn: fn(n_tokens))
            short_w, short_c = _timed(lambda fn=fn: fn(1))
            wall[name].append((long_w - short_w) / (n_tokens - 1))
            cpu[name].append((long_c - short_c) / (n_tokens - 1))
    engine.close()
    ref.close()
    out: dict[str, dict[str, float]] = {}
    for name in sides:
        out[name] = {
            "wall_tps": 1.0 / statistics.median(wall[name]),
            "cpu_tps": 1.0 / statistics.median(cpu[name]),
            "wall_ratio": statistics.median(b / a for a, b in zip(wall["corral"], wall[name])),
            "cpu_ratio": statistics.median(b / a for a, b in zip(cpu["corral"], cpu[name])),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=0, help="tokens per timed run (default 200 tiny / 48 big)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--big-hidden", type=int, default=2048, help="hidden size of the big miniature (2048 = ~1 GB Q8_0)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-ask-") as tmp:
        folder = Path(tmp)
        models = [("tiny (64 hidden, 128K vocab, F16/F32)", _tiny(folder), args.tokens or (100 if args.quick else 200))]
        if not args.quick:
            big = _big(folder, args.big_hidden)
            models.append((f"miniature {args.big_hidden} hidden x 8 layers, Q8_0 {big.stat().st_size / 2**30:.2f} GiB",
                           big, args.tokens or 48))
        for label, path, n in models:
            print(f"benchmarking {label} ({n} tokens x {args.repeat}, {args.threads} thread(s))...", file=sys.stderr)
            rows.append((label, n, bench_file(path, args.threads, n, args.repeat)))
    print(f"Threads: {args.threads}; {args.repeat} alternating rounds; medians. Ratios are corral / reference "
          "per round (> 1 = corral faster); CPU = process CPU time, less sensitive to other load on the machine.\n")
    print("| model | tokens/run | corral tok/s (wall / CPU) | create_chat_completion tok/s | Llama.generate tok/s | "
          "corral / chat (wall, CPU) | corral / generate (wall, CPU) |")
    print("|---|---|---|---|---|---|---|")
    for label, n, r in rows:
        ours, chat, raw = r["corral"], r["create_chat_completion"], r["Llama.generate"]
        print(f"| {label} | {n} | {ours['wall_tps']:.1f} / {ours['cpu_tps']:.1f} | "
              f"{chat['wall_tps']:.1f} / {chat['cpu_tps']:.1f} | {raw['wall_tps']:.1f} / {raw['cpu_tps']:.1f} | "
              f"{chat['wall_ratio']:.3f}, {chat['cpu_ratio']:.3f} | {raw['wall_ratio']:.3f}, {raw['cpu_ratio']:.3f} |")


if __name__ == "__main__":
    main()
