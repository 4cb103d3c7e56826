"""Plan accuracy against llama.cpp itself: buffer sizes it logs and quantizer sizes (speed: bench_speed.py).

    python -m bench.bench_plan

Writes a markdown table to stdout. Needs llama-cpp-python (CPU build is enough).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from corral.convert.llama_family import LlamaHParams
from corral.offload import catalog, memory
from tests.helpers.llama_ref import llama_buffers, quantizer_tensor_bytes, synth_gguf, tokenizer_kvs

MiB = 1024**2


# ---------------------------------------------------------------- the benchmark

MEMORY_CASES = [("256x2", catalog.ModelShape("mini", LlamaHParams(256, 2, 8, 2, 512))),
                ("512x4", catalog.ModelShape("mid", LlamaHParams(512, 4, 8, 4, 1536)))]


def main() -> int:
    from corral.convert.minimodel import MiniSpec, build_checkpoint
    from corral.offload.api import PlanOptions, plan_profile
    from corral.offload.hardware import Hardware, cpu_info
    from corral.offload.profile import profile_from_gguf, profile_from_shape

    ap = argparse.ArgumentParser(description=__doc__)
    ap.parse_args()
    results: dict[str, Any] = {"memory": [], "quant": []}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        kvs = tokenizer_kvs(build_checkpoint(tmp / "ckpt", MiniSpec(), seed=0))
        flags, name = cpu_info()
        hw_mem = Hardware(ram_total=64 * 1024**3, ram_available=60 * 1024**3, cpu_flags=flags, cpu_name=name)
        print("## memory: predicted CPU bytes vs llama.cpp's logged buffers\n")
        print("| model | type | n_ctx | llama.cpp MiB | corral MiB | ratio |\n|---|---|---|---|---|---|")
        for label, shape in MEMORY_CASES:
            for q in ("BF16", "Q4_K_M", "Q4_0"):
                path = synth_gguf(tmp / f"{label}-{q}.gguf", shape, q, kvs)
                for ctx in (512, 32768):
                    real = llama_buffers(path, n_ctx=ctx)
                    c = plan_profile(profile_from_gguf(path), PlanOptions(n_ctx=ctx), hw_mem).device("CPU")
                    pred = c.mapped_range_bytes + c.repack_bytes + c.kv_bytes + c.compute_bytes + c.output_bytes
                    tot = sum(v for k, v in real.items() if k != "kv size")
                    results["memory"].append((label, q, ctx, tot, pred))
                    print(f"| {label} | {q} | {ctx} | {tot / MiB:.1f} | {pred / MiB:.1f} | {pred / tot:.4f} |")
        for label, shape in [("8B", catalog.CATALOG["llama-3.1-8b"]), ("70B", catalog.CATALOG["llama-3.1-70b"])]:
            path = synth_gguf(tmp / f"{label}.gguf", shape, "Q4_K_M", kvs)
            for ctx, fa in ((8192, True), (4096, False)):
                if label == "70B" and not fa:
                    continue
                real = llama_buffers(path, n_ctx=ctx, flash_attn=fa, no_alloc=True)["CPU compute"]
                pred = memory.compute_buffer_bytes(profile_from_gguf(path), ctx, 512, fa)
                print(f"| {label} (compute only, no_alloc) | Q4_K_M | {ctx} fa={fa} | {real / MiB:.1f} | "
                      f"{pred / MiB:.1f} | {pred / real:.4f} |")
                results["memory"].append((label, "compute", ctx, real, pred))
        print("\n## file size for a target quant vs llama.cpp's quantizer (dry run)\n")
        print("| shape | type | llama.cpp MiB | corral MiB | ratio |\n|---|---|---|---|---|")
        for label, shape in [("512x6", catalog.ModelShape("a", LlamaHParams(512, 6, 8, 2, 1536))),
                             ("768x3 tied", catalog.ModelShape("b", LlamaHParams(768, 3, 12, 4, 2048, tie_embeddings=True)))]:
            src = synth_gguf(tmp / "src.gguf", shape, "BF16", kvs)
            for q in ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"):
                real = quantizer_tensor_bytes(src, q)
                pred = profile_from_shape(shape, q).tensor_bytes
                results["quant"].append((label, q, real, pred))
                print(f"| {label} | {q} | {real / MiB:.2f} | {pred / MiB:.2f} | {pred / real:.4f} |")
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_plan.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
