"""The memory model: bytes llama.cpp allocates for weights, KV cache, compute and output buffers, per device.

Facts from llama.cpp (llama-cpp-python 0.3.36's vendor tree):
- llama-context.cpp: n_ctx is padded to 256; n_batch = min(n_ctx, n_batch); n_ubatch = min(n_batch, n_ubatch);
  the output buffer holds n_vocab floats per sequence (one sequence here); the compute graph is reserved for
  the worst case: n_ubatch tokens against a full KV cache, with logits for every token of the ubatch.
- llama-kv-cache.cpp: per layer K is [n_embd_k_gqa, kv_size] and V [n_embd_v_gqa, kv_size] in type_k/type_v,
  living on the device of its layer.
- ggml-cpu/repack.cpp: on AVX2 CPUs, Q4_0, Q4_K, IQ4_NL and MXFP4 matrices (rows a multiple of 8) are copied
  into a CPU_REPACK buffer (AVX512 adds Q2_K); llama-model.cpp puts the CUDA host buffer type ahead of the
  repack type when a GPU is present, and with mmap that becomes plain mapped memory: no repack then.
"""

from __future__ import annotations

from collections.abc import Iterable

from gguf import GGMLQuantizationType

from corral.convert.errors import UsageError
from corral.convert.gguf_file import tensor_nbytes

from corral.convert.units import MiB
from .profile import ModelProfile, TensorInfo

T = GGMLQuantizationType

CTX_PAD = 256
KV_TYPES: dict[str, GGMLQuantizationType] = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "bf16": T.BF16,
                                             "f32": T.F32}
TENSOR_ALIGNMENT = 32  # ggml CPU buffers align each tensor to 32 bytes

# CUDA context, cuBLAS workspace and the CUDA kernels' own pools per GPU: several hundred MiB (observed
# with nvidia-smi on llama.cpp CUDA builds; larger on newer architectures).
CUDA_OVERHEAD = 450 * MiB
# The Python process, llama-cpp-python and the ggml libraries before any model: measured RSS (bench).
PROCESS_OVERHEAD = 250 * MiB


def gpu_margin(capacity: int) -> int:
    """VRAM kept free as a safety margin: fragmentation, driver growth, display."""
    return max(256 * MiB, capacity // 32)


def ram_margin(capacity: int) -> int:
    """RAM left for the OS and everything else."""
    return max(512 * MiB, capacity // 20)


def kv_type(name: str) -> GGMLQuantizationType:
    try:
        return KV_TYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown KV cache type {name!r}: choose f16, q8_0 or q4_0") from None


def pad_ctx(n_ctx: int) -> int:
    return -(-max(1, int(n_ctx)) // CTX_PAD) * CTX_PAD


def kv_bytes_per_layer(profile: ModelProfile, n_ctx: int, kv: str = "f16") -> int:
    """K and V of one layer for n_ctx cells (n_ctx already padded)."""
    return 2 * tensor_nbytes((profile.n_embd_kv,), kv_type(kv)) * n_ctx


def batches(n_ctx: int, n_batch: int, n_ubatch: int) -> tuple[int, int]:
    """(n_batch, n_ubatch) as llama.cpp settles them for this context."""
    nb = min(n_ctx, n_batch)
    return nb, min(nb, n_ubatch)


def output_buffer_bytes(profile: ModelProfile) -> int:
    """Logits for one sequence (llama_context::output_reserve with n_seq_max = 1)."""
    return profile.n_vocab * 4


# ---------------------------------------------------------------- compute buffers

def compute_parts(profile: ModelProfile, n_ctx: int, n_ubatch: int, flash_attn: bool) -> dict[str, int]:
    """Peak live activations (f32) of the worst-case ubatch, by phase: a layer's attention and its FFN (each with
    the graph inputs still alive) and the output head (logits for every token of the ubatch). ggml-alloc reuses
    freed tensors, so the buffer is the largest phase. Fitted to llama.cpp's logged sizes within ~3% for shapes
    from 256 to 16384 wide (bench/bench_plan.py)."""
    t = n_ubatch
    e, ekv, ff, v = profile.n_embd, profile.n_embd_kv, profile.n_ff, profile.n_vocab
    nq = profile.n_head * profile.head_dim
    if flash_attn:
        mask = n_ctx * _pad(t, 64) * 2  # f16 mask, rows padded (GGML_KQ_MASK_PAD)
        attn = (2 * nq + 2 * ekv) * t * 4  # q, k, v, attention output
    else:
        mask = n_ctx * t * 4
        attn = (2 * nq + 2 * ekv) * t * 4 + n_ctx * t * profile.n_head * 4  # + the KQ matrix
    inputs = e * t * 4 + t * 4 * 2 + mask  # embeddings, positions, output ids, KQ mask
    return {
        "attn": inputs + 2 * e * t * 4 + attn,  # + residual stream and its normed copy
        "ffn": inputs + 3 * e * t * 4 + 3 * ff * t * 4,  # gate, up, their product
        "output": (v + 2 * e) * t * 4,  # logits, final norm
    }


def compute_buffer_bytes(profile: ModelProfile, n_ctx: int, n_ubatch: int, flash_attn: bool,
                         *, layers: bool = True, output: bool = True) -> int:
    """Compute buffer of one backend that runs `layers` and/or the `output` head."""
    parts = compute_parts(profile, n_ctx, n_ubatch, flash_attn)
    peaks = [0]
    if layers:
        peaks += [parts["attn"], parts["ffn"]]
    if output:
        peaks.append(parts["output"])
    return max(peaks)


def host_compute_bytes(profile: ModelProfile, n_ubatch: int) -> int:
    """The CPU-side (CUDA_Host) compute buffer when every layer and the head run on GPUs: embeddings in."""
    return profile.n_embd * n_ubatch * 4 * 2 + n_ubatch * 16


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


# ---------------------------------------------------------------- weights on the CPU

REPACK_AVX2 = frozenset({T.Q4_0, T.Q4_K, T.IQ4_NL, T.MXFP4})
REPACK_AVX512 = REPACK_AVX2 | {T.Q2_K}


def repack_types(cpu_flags: Iterable[str], has_gpu: bool) -> frozenset[GGMLQuantizationType]:
    """The weight types llama.cpp's CPU backend keeps repacked copies of (see module docstring)."""
    flags = frozenset(cpu_flags)
    if has_gpu or "avx2" not in flags:
        return frozenset()
    return REPACK_AVX512 if "avx512f" in flags else REPACK_AVX2


def is_repacked(t: TensorInfo, types: frozenset[GGMLQuantizationType]) -> bool:
    """Whether llama.cpp's CPU backend keeps a repacked copy of this tensor, given repack_types(...)."""
    return (t.ggml_type in types and t.kind in ("attn", "ffn", "output") and len(t.shape) == 2
            and t.shape[1] % 8 == 0)


def cpu_buffers(cpu_tensors: Iterable[TensorInfo], cpu_flags: Iterable[str], has_gpu: bool) -> dict[str, int]:
    """llama.cpp's own accounting of CPU weight buffers: CPU_Mapped is the file range spanning the mapped
    tensors of each file (gaps included), CPU_REPACK the repacked copies; also the bytes really used."""
    types = repack_types(cpu_flags, has_gpu)
    ranges: dict[int, list[int]] = {}
    mapped = repack = 0
    for t in cpu_tensors:
        if is_repacked(t, types):
            repack += _pad(t.nbytes, TENSOR_ALIGNMENT)
            continue
        mapped += t.nbytes
        if t.offset >= 0:
            lo_hi = ranges.setdefault(t.file_index, [t.offset, t.offset + t.nbytes])
            lo_hi[0] = min(lo_hi[0], t.offset)
            lo_hi[1] = max(lo_hi[1], t.offset + t.nbytes)
    mapped_range = sum(hi - lo for lo, hi in ranges.values()) if ranges else mapped
    return {"CPU_Mapped": mapped_range, "CPU_REPACK": repack, "mapped_used": mapped}
