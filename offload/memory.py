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
- ggml-cpu/amx: on CPUs with AMX-INT8 (and a build with __AMX_INT8__ + __AVX512VNNI__) an `AMX` buffer comes
  first in the CPU extra buffer list (ggml-cpu.cpp ggml_backend_cpu_get_extra_buffer_types: AMX, then
  CPU_REPACK); llama-model-loader.cpp select_weight_buft gives each weight the first buffer whose supports_op
  accepts its MUL_MAT, so AMX wins for a type both take. Rules and sizes: see amx_nbytes.
"""

from __future__ import annotations

from collections.abc import Iterable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from corral.convert.errors import UsageError
from corral.convert.tensor_specs import tensor_nbytes
from corral.convert.units import MiB

from .profile import ModelProfile, TensorInfo

T = GGMLQuantizationType

CTX_PAD = 256
# The KV cache types llama.cpp accepts (common/arg.cpp kv_cache_types), by ggml's lower-case name; f16 first.
KV_TYPES: dict[str, GGMLQuantizationType] = {
    t.name.lower(): t for t in (T.F16, T.F32, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.IQ4_NL, T.Q5_0, T.Q5_1)}
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
    """The GGML type of a KV cache type name (any case); UsageError names the choices."""
    try:
        return KV_TYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown KV cache type {name!r}: choose from {', '.join(KV_TYPES)}") from None


def kv_is_quantized(name: str) -> bool:
    """Block-quantized (q8_0, q4_0, ...) rather than a float type (f16, bf16, f32)."""
    return GGML_QUANT_SIZES[kv_type(name)][0] > 1


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


STREAM_OUTPUT_ROWS = 16  # logits rows generation asks for at once: one, or a speculative verify's few


def touched_compute_bytes(profile: ModelProfile, n_ctx: int, n_ubatch: int, flash_attn: bool) -> int:
    """What generation writes of the CPU compute buffer: a full ubatch's layer activations, and logits for a few
    rows only. llama.cpp reserves logits for every token of a ubatch; ggml-alloc places each graph's tensors from
    the start of the buffer, so the rest of that reservation is never touched (and never charged to a memory
    cgroup). What a model that streams from disk must leave room for besides its weights."""
    parts = compute_parts(profile, n_ctx, n_ubatch, flash_attn)
    output = (profile.n_vocab + 2 * profile.n_embd) * min(n_ubatch, STREAM_OUTPUT_ROWS) * 4
    return max(parts["attn"], parts["ffn"], output)


VOCAB_HEAP_PER_TOKEN = 480  # llama.cpp's vocabulary on the heap: ~60 MiB for Llama 3's 128,256 tokens (measured)


# Memory a streaming engine leaves unused in a memory cgroup besides its read-ahead window: the 2 MiB folios at
# the edges of streamed units, small heap growth (the engine measures the group again every few seconds and
# frees resident units when its anonymous memory grew). A fixed size: measured with 32 MiB against limit/32 in a
# 5.2 GiB group (a 6.7 GiB F16 model at file/limit 1.3), what was read per token stayed what streamed (1.226
# against 1.300 GiB, 1.08-1.29 against 1.05-1.27 tok/s); in 0.4-0.9 GiB groups 8 and 16 MiB read more.
STREAM_MARGIN = 32 * MiB


def stream_holdback(unwritten: int) -> int:
    """Memory a streaming engine leaves out of its resident set in a memory cgroup when the compute buffer still
    has `unwritten` bytes a batch may write: the margin and that reserve share the room (until a batch writes it,
    the reserve is free room the streaming uses; once written, the engine measures again and frees resident
    units). Measured at file/limit 1.3 and 3: 0.200 and 0.757 GiB read per token against 0.220 and 0.80 with the
    two added (BENCHMARKS.md)."""
    return max(STREAM_MARGIN, unwritten)


# A streamed layer's steps in llama.cpp's graph, each named by the node that starts it: attention (whose weights sit
# at the layer's end in a Llama GGUF), the FFN's gate matrix, its up matrix, its down matrix (the layer's first
# tensor in the file). The streaming engine drops each step once computed, so its read-ahead room holds a step, not
# a layer: measured on a 2.8 GiB BF16 model (16 layers of 116 MiB) at file/limit 1.27 and 3, 0.29 and 1.61 GiB read
# per token against 0.38 and 1.73 a layer at a time.
STREAM_STEPS = ("attn_norm", "ffn_norm", "ffn_gate", "ffn_swiglu")


def stream_step(name: str) -> int:
    """Which step of its layer reads a tensor (STREAM_STEPS): FFN down 3, up 2, gate and the FFN norm 1, the rest 0."""
    kind = name.split(".")[2] if name.count(".") >= 2 else ""
    for step, prefix in ((3, "ffn_down"), (2, "ffn_up"), (1, "ffn")):
        if kind.startswith(prefix):
            return step
    return 0


def largest_stream_step(tensors: Iterable[TensorInfo]) -> int:
    """The bytes of a layer's largest step (STREAM_STEPS), the median over layers (0: no layers)."""
    steps: dict[tuple[int, int], int] = {}
    for t in tensors:
        if t.layer is not None:
            key = (t.layer, stream_step(t.name))
            steps[key] = steps.get(key, 0) + t.nbytes
    largest: dict[int, int] = {}
    for (layer, _), n in steps.items():
        largest[layer] = max(largest.get(layer, 0), n)
    sizes = sorted(largest.values())
    return sizes[len(sizes) // 2] if sizes else 0


STREAM_WINDOW_MIN = 64 * MiB  # read-ahead room of a small model (at most an eighth of it)
# ... and never less than this: a step computing, the next step's first read and the folios at their edges are in
# memory at once, and with less room the kernel evicts read-ahead before compute reaches it (measured on a 1.2 GiB
# F16 model, 8 MiB steps, at file/limit 1.3: a 16 MiB room read 0.18-0.23 GiB per token where 0.167 streamed)
STREAM_WINDOW_FLOOR = 32 * MiB
# The read-ahead room is read again every token (it cannot hold resident weights), so it is capped at 1/share of
# what is missing, but never less than one unit (the layer computing must fit): a 64 MiB window when 190 MiB are
# missing reads a third more than needed.
STREAM_WINDOW_SHARE = 8


# What streams is taken as slices from as many layers as slices as big as the read-ahead room allow, spread evenly
# over the token, not as whole layers: with a few whole layers streamed, long stretches of resident layers compute
# between them while the prefetch thread's room is full and the disk waits; with a slice every layer or two, the
# disk reads through every stretch. Not smaller than the room: a slice costs folios at its edges and graph
# breaks, and where a layer is about the room (a small model) whole layers already leave short stretches
# (measured on a 1.18 GiB model with 29 MiB layers at file/limit 1.3: 16 MiB slices ran 2-11% slower).
def stream_slices(streamed: int, units: int, room: int) -> int:
    """How many units (layers and the output head) `streamed` bytes a token are read from as slices at least the
    read-ahead `room`."""
    if streamed <= 0 or units <= 0:
        return 0
    return max(1, min(units, streamed // max(1, room)))


def stream_window(unit: int, total: int, missing: int, share: int = STREAM_WINDOW_SHARE) -> int:
    """The streaming engine's read-ahead room, from a typical unit (a layer's largest step), what a token reads
    (`total`) and what of it cannot stay resident (`missing`): two units, at least 64 MiB (an eighth of a small
    model), but at most 1/`share` of what is missing (0: no cap), and never less than a unit or
    STREAM_WINDOW_FLOOR (an eighth of a small model). Measured on a 1.2 GB file: a wider window (6 units) read more per token, not less."""
    if missing <= 0:
        return 0
    full = max(2 * unit, min(STREAM_WINDOW_MIN, total // 8))
    return max(unit, min(STREAM_WINDOW_FLOOR, total // 8), min(full, missing // share) if share else full)


def cgroup_streamed_bytes(profile: ModelProfile, per_token_mapped: int, available: int, written: int, n_ctx: int,
                          n_ubatch: int, flash_attn: bool) -> int:
    """What the streaming engine reads per token inside a memory cgroup: it measures what loading wrote (not
    llama.cpp's reservations), keeps what fits beside it resident and streams the rest plus its read-ahead room.
    `available`: the group's room before loading; `written`: KV cache, extra buffers and output buffer."""
    written += profile.n_vocab * VOCAB_HEAP_PER_TOKEN
    held = stream_holdback(touched_compute_bytes(profile, n_ctx, n_ubatch, flash_attn))
    missing = per_token_mapped - max(0, available - written - held)
    if missing <= 0:
        return 0
    unit = largest_stream_step(profile.tensors) or per_token_mapped // max(1, profile.n_layer + 1)
    return min(per_token_mapped, missing + stream_window(unit, per_token_mapped, missing))


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


# amx/common.h qtype_has_amx_kernels: the types AMX repacks into its own layout.
AMX_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS})
# amx/amx.cpp extra_buffer_type::supports_op: the row length (ne0) must be a multiple of this per type; F16 is
# accepted too (copied, not repacked); every other type stays out of the AMX buffer.
_AMX_K_ALIGN = {T.Q4_0: 32, T.Q4_1: 32, T.Q8_0: 32, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256, T.IQ4_XS: 256,
                T.F16: 16}
# amx/amx.cpp supports_op: the number of rows (the MUL_MAT result's ne0 = the weight's ne1) must be a multiple
# of TILE_N * 2 (amx/common.h: TILE_N = 16).
AMX_ROWS_ALIGN = 32
# amx/mmq.cpp get_row_size: bytes added per quant block of a row (Q8_0: int32 compensation; Q4_K/Q5_K: unpacked
# scales and mins; IQ4_XS: unpacked scales); other AMX types keep their block size.
_AMX_BLOCK_EXTRA = {T.Q8_0: 4, T.Q4_K: 4, T.Q5_K: 4, T.IQ4_XS: 2}


def has_amx(cpu_flags: Iterable[str]) -> bool:
    """Whether llama.cpp (a native build) has its AMX buffer on this CPU: AMX-INT8 and AVX512-VNNI in the flags
    (amx.cpp is compiled only under __AMX_INT8__ && __AVX512VNNI__). llama.cpp also asks the kernel for tile-data
    permission (arch_prctl ARCH_REQ_XCOMP_PERM) and drops the buffer when refused: the probe sees that."""
    flags = frozenset(cpu_flags)
    return "amx_int8" in flags and "avx512_vnni" in flags


def amx_types(cpu_flags: Iterable[str], has_gpu: bool) -> frozenset[GGMLQuantizationType]:
    """The weight types llama.cpp puts in its AMX buffer (none with a GPU: the CUDA host buffer comes first)."""
    if has_gpu or not has_amx(cpu_flags):
        return frozenset()
    return frozenset(_AMX_K_ALIGN)


def amx_nbytes(t: TensorInfo, types: frozenset[GGMLQuantizationType]) -> int | None:
    """Bytes the tensor takes in the AMX buffer (amx/mmq.cpp ggml_backend_amx_get_alloc_size: rows x
    get_row_size for the repacked types, ggml_nbytes for F16), or None when AMX does not take it."""
    if t.ggml_type not in types or t.kind not in ("attn", "ffn", "output") or len(t.shape) != 2:
        return None
    k, n = t.shape
    if k % _AMX_K_ALIGN[t.ggml_type] or n % AMX_ROWS_ALIGN:
        return None
    if t.ggml_type not in AMX_TYPES:
        return t.nbytes
    block, type_size = GGML_QUANT_SIZES[t.ggml_type]
    blocks = k // block
    return n * blocks * (type_size + _AMX_BLOCK_EXTRA.get(t.ggml_type, 0))


def cpu_buffer_of(t: TensorInfo, amx: frozenset[GGMLQuantizationType],
                  repack: frozenset[GGMLQuantizationType]) -> tuple[str, int]:
    """(buffer, bytes) llama.cpp gives one CPU weight: AMX first, then CPU_REPACK, else CPU_Mapped (the file)."""
    nbytes = amx_nbytes(t, amx)
    if nbytes is not None:
        return "AMX", _pad(nbytes, TENSOR_ALIGNMENT)
    if is_repacked(t, repack):
        return "CPU_REPACK", _pad(t.nbytes, TENSOR_ALIGNMENT)
    return "CPU_Mapped", t.nbytes


def _extra_types(flags: frozenset[str], has_gpu: bool, absent: frozenset[str]
                 ) -> tuple[frozenset[GGMLQuantizationType], frozenset[GGMLQuantizationType]]:
    """(AMX types, CPU_REPACK types), leaving out buffers a probe found llama.cpp does not create here."""
    amx = frozenset() if "AMX" in absent else amx_types(flags, has_gpu)
    repack = frozenset() if "CPU_REPACK" in absent else repack_types(flags, has_gpu)
    return amx, repack


def extra_buffers_used(cpu_tensors: Iterable[TensorInfo], cpu_flags: Iterable[str], has_gpu: bool,
                       absent: frozenset[str] = frozenset()) -> set[str]:
    """The CPU extra buffer types (AMX, CPU_REPACK) llama.cpp would put any of these weights in."""
    amx, repack = _extra_types(frozenset(cpu_flags), has_gpu, absent)
    return {b for b in (cpu_buffer_of(t, amx, repack)[0] for t in cpu_tensors) if b != "CPU_Mapped"}


def tied_output(embd: TensorInfo) -> TensorInfo:
    """The output matrix llama.cpp loads again from token_embd when embeddings are tied (a MUL_MAT weight,
    so it may land in an extra buffer; mapped, it shares token_embd's file range)."""
    return TensorInfo(name="output.weight", shape=embd.shape, ggml_type=embd.ggml_type)


def cpu_buffers(cpu_tensors: Iterable[TensorInfo], cpu_flags: Iterable[str], has_gpu: bool,
                duplicates: Iterable[TensorInfo] = (), absent: frozenset[str] = frozenset()) -> dict[str, int]:
    """llama.cpp's own accounting of CPU weight buffers: CPU_Mapped is the file range spanning the mapped
    tensors of each file (gaps included), CPU_REPACK and AMX the repacked copies; also the bytes really used.
    `duplicates` (a tied output) count only where they land in an extra buffer; `absent` names extra buffers
    llama.cpp does not create on this machine (a probe saw it: a build without AMX, tile data refused)."""
    amx, types = _extra_types(frozenset(cpu_flags), has_gpu, absent)
    ranges: dict[int, list[int]] = {}
    mapped = 0
    extra = {"CPU_REPACK": 0, "AMX": 0}
    for t in duplicates:
        where, nbytes = cpu_buffer_of(t, amx, types)
        if where != "CPU_Mapped":
            extra[where] += nbytes
    for t in cpu_tensors:
        where, nbytes = cpu_buffer_of(t, amx, types)
        if where != "CPU_Mapped":
            extra[where] += nbytes
            continue
        mapped += t.nbytes
        if t.offset >= 0:
            lo_hi = ranges.setdefault(t.file_index, [t.offset, t.offset + t.nbytes])
            lo_hi[0] = min(lo_hi[0], t.offset)
            lo_hi[1] = max(lo_hi[1], t.offset + t.nbytes)
    mapped_range = sum(hi - lo for lo, hi in ranges.values()) if ranges else mapped
    return {"CPU_Mapped": mapped_range, **extra, "mapped_used": mapped}
