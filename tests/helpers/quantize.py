"""Builders shared by the quantization tests and bench/: tiny Llama GGUFs, both imatrix formats, and direct
llama_model_quantize calls (the reference)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from corral.convert.llama_family import LlamaHParams, gguf_tensor_specs
from corral.convert.safetensors_io import float32_to_bf16_bits


@dataclass(frozen=True)
class Shape:
    """A miniature Llama model shape."""

    hidden: int = 256
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn: int = 512
    vocab: int = 320
    tied: bool = False


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor; numpy shape is GGUF shape reversed."""
    specs = gguf_tensor_specs(LlamaHParams(n_embd=s.hidden, n_layer=s.n_layers, n_head=s.n_heads, n_head_kv=s.n_kv_heads,
                                           n_ff=s.ffn, n_vocab=s.vocab, tie_embeddings=s.tied))
    return [(t.name, tuple(reversed(t.shape))) for t in specs]


def write_mini_gguf(path: Path, s: Shape = Shape(), *, dtype: str = "bf16", seed: int = 0,
                    tensor_types: dict[str, np.ndarray] | None = None) -> Path:
    """A loadable miniature Llama GGUF (arch keys + small gpt2 vocab) with random weights."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("mini")
    w.add_context_length(2048)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_dimension_count(s.hidden // s.n_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.vocab)
    w.add_file_type({"f32": 0, "f16": 1, "bf16": 32}[dtype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    tokens = [f"t{i}" for i in range(s.vocab)]
    w.add_token_list(tokens)
    w.add_token_types([1] * s.vocab)
    w.add_token_merges(["t 1", "t 2"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for name, shape in tensor_shapes(s):
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1 or dtype == "f32":
            w.add_tensor(name, data)
        elif dtype == "f16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, float32_to_bf16_bits(data), raw_dtype=T.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_imatrix(s: Shape, seed: int = 1) -> dict[str, np.ndarray]:
    """Positive per-column weights for every 2-D weight (what llama-imatrix would average to)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensor_shapes(s):
        if len(shape) == 2 and name not in ("token_embd.weight",):
            out[name] = (rng.random(shape[1]) + 0.05).astype(np.float32)
    return out


def write_legacy_imatrix(path: Path, sums: dict[str, np.ndarray], ncall: int = 10, *,
                         dataset: str | None = "wiki.train.raw") -> Path:
    """llama.cpp's legacy .dat imatrix: values stored as mean * ncall."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<i", len(sums)))
        for name, mean in sums.items():
            raw = name.encode()
            values = (mean * np.float32(ncall)).astype("<f4")
            fh.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size))
            fh.write(values.tobytes())
        if dataset is not None:
            fh.write(struct.pack("<i", 7) + struct.pack("<i", len(dataset)) + dataset.encode())
    return path


def write_gguf_imatrix(path: Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray], *,
                       with_counts: bool = True) -> Path:
    """llama.cpp's GGUF imatrix: <name>.in_sum2 [ne0, n_mat] and <name>.counts [1, n_mat]."""
    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["calib.txt"])
    w.add_uint32("imatrix.chunk_count", 12)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, values in sums.items():
        n = counts[name]
        w.add_tensor(name + ".in_sum2", values.reshape(n.size, -1).astype(np.float32))
        if with_counts:
            w.add_tensor(name + ".counts", n.reshape(n.size, 1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_quantize(src: Path, out: Path, ftype: int, *, imatrix: dict[str, np.ndarray] | None = None,
                   dry_run: bool = False, threads: int = 2, keep_split: bool = False,
                   allow_requantize: bool = False,
                   overrides: list[tuple[str, str | int]] | None = None) -> tuple[int, str]:
    """Call llama_model_quantize directly, in-process (the reference); returns (rc, captured log)."""
    import ctypes

    import llama_cpp
    import llama_cpp._logger as llama_logger

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunks.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.dry_run = dry_run
    params.keep_split = keep_split
    params.allow_requantize = allow_requantize
    keep: list[object] = []
    if imatrix is not None:
        names = [n.encode() for n in imatrix]
        bufs = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
        arr = (llama_cpp.llama_model_imatrix_data * (len(bufs) + 1))()
        for i, (n, b) in enumerate(zip(names, bufs)):
            arr[i].name = n
            arr[i].data = b.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = b.size
        keep += [names, bufs, arr]
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if overrides:
        kvs = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()
        for i, (key, value) in enumerate(overrides):
            kvs[i].key = key.encode()
            if isinstance(value, str):
                kvs[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                kvs[i].value.val_str = value.encode()
            else:
                kvs[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                kvs[i].value.val_i64 = value
        keep.append(kvs)
        params.kv_overrides = ctypes.cast(kvs, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    return rc, "".join(chunks)


def llama_dry_run_types(src: Path, ftype: int, *, imatrix: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """{tensor: target type name} as llama.cpp's own dry run reports them."""
    from corral.convert.quantize import parse_tensor_lines

    rc, log = llama_quantize(src, Path("/dev/null"), ftype, imatrix=imatrix, dry_run=True)
    assert rc == 0, log[-2000:]
    return {name: out for name, (_, out) in parse_tensor_lines(log.splitlines()).items()}
