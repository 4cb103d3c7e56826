"""Plan accuracy against llama.cpp itself: buffer sizes it logs, quantizer sizes, and measured tokens/s.

    python -m bench.bench_plan [--quick]

Writes a markdown table to stdout. Needs llama-cpp-python (CPU build is enough).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, Keys

from corral.convert import quant_rules, quant_types
from corral.convert.gguf_writer import TensorSpec, build_header, pad_to
from corral.offload import catalog, memory
from corral.offload.profile import shape_tensor_types

MiB = 1024**2


# ---------------------------------------------------------------- synthetic GGUFs (sparse: no disk used)

def tokenizer_kvs(folder: Path) -> list[tuple[str, Any, GGUFValueType]]:
    """The real Llama 3 tokenizer keys, from a miniature checkpoint folder (convert.minimodel)."""
    from corral.convert.vocab import vocab_kvs

    config = json.loads((folder / "config.json").read_text())
    return vocab_kvs(folder, 128256, config)


def synth_gguf(path: Path, shape: catalog.ModelShape, quant: str, tok_kvs: list, *, sparse: bool = True) -> Path:
    """A Llama GGUF with `shape`, tensor types as llama.cpp's quantizer would choose for `quant`, all-zero data
    (a sparse file). llama.cpp loads it like any model: its buffer sizes are real."""
    info, specs, types = shape_tensor_types(shape, quant)
    tensors = [TensorSpec(s.name, tuple(s.shape), types[s.name], quant_rules.tensor_nbytes(s.shape, types[s.name]))
               for s in quant_rules.llama_cpp_order(specs)]
    u32, f32, s_ = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    kvs = [
        (Keys.General.ARCHITECTURE, "llama", s_), (Keys.General.NAME, shape.name, s_),
        (Keys.General.FILE_TYPE, int(info.ftype), u32),
        ("llama.block_count", shape.n_layer, u32), ("llama.context_length", shape.n_ctx_train, u32),
        ("llama.embedding_length", shape.n_embd, u32), ("llama.feed_forward_length", shape.n_ff, u32),
        ("llama.attention.head_count", shape.n_head, u32), ("llama.attention.head_count_kv", shape.n_head_kv, u32),
        ("llama.rope.freq_base", 500000.0, f32), ("llama.attention.layer_norm_rms_epsilon", 1e-5, f32),
        ("llama.rope.dimension_count", shape.head_size, u32), ("llama.vocab_size", shape.n_vocab, u32),
        ("llama.attention.key_length", shape.head_size, u32), ("llama.attention.value_length", shape.head_size, u32),
        *tok_kvs,
    ]
    header = build_header(kvs, tensors)
    size = len(header) + sum(pad_to(t.nbytes) for t in tensors)
    with open(path, "wb") as fh:
        fh.write(header)
        if sparse:
            fh.truncate(size)
        else:
            fh.write(b"\0" * (size - len(header)))
    return path


# ---------------------------------------------------------------- llama.cpp's own accounting

_PROBE = r"""
import json, sys
import llama_cpp
a = json.loads(sys.argv[1])
kv = {"f16": 1, "q8_0": 8, "q4_0": 2}[a["kv"]]
if a["no_alloc"]:
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.no_alloc = True
    mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    mp.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(a["path"].encode(), mp)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = a["n_ctx"], a["n_batch"], a["n_ubatch"]
    cp.flash_attn_type = 1 if a["fa"] else 0
    cp.type_k = cp.type_v = kv
    ctx = llama_cpp.llama_init_from_model(model, cp)
    assert ctx
else:
    llm = llama_cpp.Llama(a["path"], n_ctx=a["n_ctx"], n_batch=a["n_batch"], n_ubatch=a["n_ubatch"],
                          flash_attn=a["fa"], type_k=kv, type_v=kv, n_gpu_layers=0, verbose=True)
"""
_BUF_RE = re.compile(r"(\w+)\s+(model|KV|compute|output) buffer size\s*=\s*([0-9.]+) MiB")
_KV_SIZE_RE = re.compile(r"llama_kv_cache: size =\s*([0-9.]+) MiB")


def llama_buffers(path: Path, *, n_ctx: int, n_batch: int = 2048, n_ubatch: int = 512, flash_attn: bool = True,
                  kv: str = "f16", no_alloc: bool = False) -> dict[str, int]:
    """Load `path` in a fresh llama.cpp (CPU) and return the buffer sizes it logs, in bytes:
    keys like 'CPU_Mapped model', 'CPU_REPACK model', 'CPU KV', 'CPU compute', 'CPU output'."""
    args = dict(path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, fa=flash_attn, kv=kv,
                no_alloc=no_alloc)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                         env=env, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"llama.cpp failed on {path}: {run.stderr[-2000:]}")
    out: dict[str, int] = {}
    for name, what, mib in _BUF_RE.findall(run.stderr):
        key = f"{name} {what}"
        out[key] = out.get(key, 0) + round(float(mib) * MiB)
    m = _KV_SIZE_RE.search(run.stderr)
    if m:
        out["kv size"] = round(float(m.group(1)) * MiB)
    return out


_DRY = r"""
import sys, llama_cpp
from gguf import LlamaFileType
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(LlamaFileType[sys.argv[3]])
p.dry_run = True
p.nthread = 1
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
sys.exit(rc)
"""
_QSIZE_RE = re.compile(r"quant size\s*=\s*([0-9.]+) MiB")


def quantizer_tensor_bytes(src: Path, quant: str) -> int:
    """Tensor data bytes llama.cpp's quantizer would write for `quant` (its dry run's 'quant size')."""
    info = quant_types.file_type(quant)
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-c", _DRY, str(src), str(Path(tmp) / "out.gguf"), info.ftype.name],
                             capture_output=True, text=True, timeout=600)
    m = _QSIZE_RE.search(run.stderr + run.stdout)
    if run.returncode != 0 or not m:
        raise RuntimeError(f"dry run failed for {src} {quant}: {run.stderr[-1500:]}")
    return round(float(m.group(1)) * MiB)


def quantize_real(src: Path, out: Path, quant: str) -> Path:
    """Quantize with llama.cpp itself (the reference quantizer)."""
    code = _DRY.replace("p.dry_run = True", "p.dry_run = False")
    info = quant_types.file_type(quant)
    subprocess.run([sys.executable, "-c", code, str(src), str(out), info.ftype.name], check=True,
                   capture_output=True, timeout=600)
    return out


_SPEED = r"""
import json, sys, time, llama_cpp
a = json.loads(sys.argv[1])
llm = llama_cpp.Llama(a["path"], verbose=False, **a["kwargs"])
llm.create_completion("Hello there, how are you", max_tokens=8, temperature=0.0)  # warm up
t = time.perf_counter()
out = llm.create_completion("Hello there, how are you", max_tokens=a["n"], temperature=0.0)
dt = time.perf_counter() - t
n = out["usage"]["completion_tokens"]
t = time.perf_counter()
llm.reset()
llm.eval(llm.tokenize(b"hello " * 200))
pp = 200 / (time.perf_counter() - t)
print(json.dumps({"tps": n / dt, "n": n, "pp": pp}))
"""


def measure_speed(path: Path, kwargs: dict, n_tokens: int = 48) -> dict[str, float]:
    """Generation speed through llama-cpp-python, as `corral ask` runs it (prompt, then greedy tokens)."""
    run = subprocess.run([sys.executable, "-c", _SPEED, json.dumps({"path": str(path), "kwargs": kwargs,
                                                                    "n": n_tokens})],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-1500:])
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the benchmark

SPEED_MODELS = [("mini 256x2", catalog.ModelShape("mini", 256, 2, 8, 2, 512), "Q4_K_M"),
                ("1024x8", catalog.ModelShape("m1k", 1024, 8, 16, 4, 4096), "Q4_K_M"),
                ("1024x8", catalog.ModelShape("m1k", 1024, 8, 16, 4, 4096), "Q8_0"),
                ("2048x8", catalog.ModelShape("m2k", 2048, 8, 16, 4, 8192), "Q4_K_M"),
                ("2048x8", catalog.ModelShape("m2k", 2048, 8, 16, 4, 8192), "BF16")]
MEMORY_CASES = [("256x2", catalog.ModelShape("mini", 256, 2, 8, 2, 512)),
                ("512x4", catalog.ModelShape("mid", 512, 4, 8, 4, 1536))]


def main() -> int:
    from corral.convert.minimodel import MiniSpec, build_checkpoint
    from corral.offload.api import PlanOptions, plan_profile
    from corral.offload.hardware import Hardware, cpu_info, detect_hardware
    from corral.offload.profile import profile_from_gguf, profile_from_shape

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="memory accuracy only")
    args = ap.parse_args()
    results: dict[str, Any] = {"memory": [], "quant": [], "speed": []}
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
        for label, shape in [("512x6", catalog.ModelShape("a", 512, 6, 8, 2, 1536)),
                             ("768x3 tied", catalog.ModelShape("b", 768, 3, 12, 4, 2048, tie_embeddings=True))]:
            src = synth_gguf(tmp / "src.gguf", shape, "BF16", kvs)
            for q in ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"):
                real = quantizer_tensor_bytes(src, q)
                pred = profile_from_shape(shape, q).tensor_bytes
                results["quant"].append((label, q, real, pred))
                print(f"| {label} | {q} | {real / MiB:.2f} | {pred / MiB:.2f} | {pred / real:.4f} |")
        if not args.quick:
            hw = detect_hardware(tmp)
            print(f"\n## generation speed, 1 thread (RAM {hw.ram_bandwidth / 1e9:.1f} GB/s measured)\n")
            print("| model | type | file MiB | measured tok/s | predicted tok/s | ratio |\n|---|---|---|---|---|---|")
            for label, shape, q in SPEED_MODELS:
                path = synth_gguf(tmp / f"speed-{label}-{q}.gguf", shape, q, kvs, sparse=False)
                prof = profile_from_gguf(path)
                plan = plan_profile(prof, PlanOptions(n_ctx=1024, n_threads=1), hw)
                m = measure_speed(path, plan.llama_kwargs)
                results["speed"].append((label, q, m["tps"], plan.tokens_per_second))
                print(f"| {label} | {q} | {prof.file_bytes / MiB:.0f} | {m['tps']:.1f} | "
                      f"{plan.tokens_per_second:.1f} | {plan.tokens_per_second / m['tps']:.2f} |")
                path.unlink()
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_plan.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
