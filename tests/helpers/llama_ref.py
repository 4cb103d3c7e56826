"""llama.cpp as the reference for sizes: synthetic GGUFs of any Llama shape, the buffer sizes llama.cpp logs
when it loads one, and what its quantizer writes. Shared by tests/test_plan_llama.py and bench/bench_plan.py."""

from __future__ import annotations

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
from corral.convert.units import MiB
from corral.offload import catalog
from corral.offload.profile import shape_tensor_types

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
    tensors = [TensorSpec(s.name, s.shape, types[s.name]) for s in quant_rules.llama_cpp_order(specs)]
    hp = shape.hparams
    u32, f32, s_ = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    kvs = [
        (Keys.General.ARCHITECTURE, "llama", s_), (Keys.General.NAME, shape.name, s_),
        (Keys.General.FILE_TYPE, int(info.ftype), u32),
        ("llama.block_count", hp.n_layer, u32), ("llama.context_length", hp.n_ctx_train, u32),
        ("llama.embedding_length", hp.n_embd, u32), ("llama.feed_forward_length", hp.n_ff, u32),
        ("llama.attention.head_count", hp.n_head, u32), ("llama.attention.head_count_kv", hp.n_head_kv, u32),
        ("llama.rope.freq_base", 500000.0, f32), ("llama.attention.layer_norm_rms_epsilon", 1e-5, f32),
        ("llama.rope.dimension_count", hp.head_dim, u32), ("llama.vocab_size", hp.n_vocab, u32),
        ("llama.attention.key_length", hp.head_dim, u32), ("llama.attention.value_length", hp.head_dim, u32),
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
