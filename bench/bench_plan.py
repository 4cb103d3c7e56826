"""Plan accuracy against llama.cpp itself: buffer sizes it logs, quantizer sizes, and measured tokens/s.

    python -m bench.bench_plan [--quick]

Writes a markdown table to stdout. Needs llama-cpp-python (CPU build is enough).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFValueType, Keys

from corral.convert import quant_rules, quant_types
from corral.convert.gguf_writer import TensorSpec, build_header, pad_to
from corral.offload import catalog

T = GGMLQuantizationType
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
    info = quant_types.file_type(quant)
    specs = quant_rules.llama_tensor_specs(
        hidden=shape.n_embd, n_layers=shape.n_layer, n_heads=shape.n_head, n_kv_heads=shape.n_head_kv,
        ffn=shape.n_ff, vocab=shape.n_vocab, head_dim=shape.head_dim, tied_embeddings=shape.tie_embeddings,
        rope_freqs=shape.rope_freqs, dtype=T.BF16)
    if info.default_type in (T.F32, T.F16, T.BF16):
        types = {s.name: (s.ggml_type if len(s.shape) == 1 else info.default_type) for s in specs}
    else:
        types = quant_rules.target_types(specs, info.ftype, has_imatrix=info.needs_imatrix)
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
