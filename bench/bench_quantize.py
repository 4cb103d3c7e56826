"""Quantize time: corral (llama_model_quantize in a stoppable child) vs llama.cpp's own call, same file.

Run: python -m bench.bench_quantize [--hidden 512 --layers 8 --ffn 1536 --vocab 4096 --repeat 3]
Prints a markdown table of best-of-N wall times and the ratio corral / llama.cpp (expect ~1.0x: the
same C code runs; corral adds a Python child start and log parsing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from corral.convert import quant_types
from corral.convert.quantize import quantize_gguf
from tests.helpers.quantize import Shape, llama_quantize, write_mini_gguf


def _best(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default="Q8_0,Q6_K,Q4_K_M,Q2_K,IQ4_XS")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shape = Shape(hidden=args.hidden, n_layers=args.layers, n_heads=8, n_kv_heads=2, ffn=args.ffn,
                      vocab=args.vocab)
        src = write_mini_gguf(folder / "bench-bf16.gguf", shape)
        print(f"model: {src.stat().st_size / 2**20:.1f} MiB BF16 (~{src.stat().st_size / 2e6:.0f}M weights), "
              f"threads={args.threads}, best of {args.repeat}\n")
        print("| type | llama.cpp (s) | corral (s) | corral / llama.cpp |")
        print("|---|---:|---:|---:|")
        for name in args.types.split(","):
            ftype = int(quant_types.file_type(name).ftype)
            ref = _best(lambda f=ftype: llama_quantize(src, folder / "ref.gguf", f, threads=args.threads),
                        args.repeat)
            ours = _best(lambda n=name: quantize_gguf(src, folder / "ours.gguf", ftype=n, threads=args.threads,
                                                      force=True), args.repeat)
            same = (folder / "ref.gguf").read_bytes() == (folder / "ours.gguf").read_bytes()
            print(f"| {name} | {ref:.2f} | {ours:.2f} | {ours / ref:.2f}x{'' if same else ' (bytes differ!)'} |")


if __name__ == "__main__":
    main()
