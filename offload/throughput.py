"""Predicted speed, physics only. A generated token reads every weight and the filled part of the KV cache once:
its time is the sum over tiers (each GPU, the CPU, the disk) of the bytes read there / that tier's bandwidth. On
the CPU the dequantizing dot products can be slower than the memory, so the CPU tier takes the larger of its
memory time and its compute time (weights / the weights/s of their types, measured on the machine by
`cpu_measure`). Add the per-token overhead measured with those rates (graph, layers, logits and sampling).
An RPC worker's device is a tier of its own (a worker's CPU like this machine's CPU) and the network one more
(offload.rpc: a round trip and the activations per stretch of layers on a worker).
Prompt processing is compute bound (big batches)."""

from __future__ import annotations

from dataclasses import dataclass

from . import memory, rpc
from .cpu_rates import TYPICAL_AVX2, TYPICAL_OTHER, CpuRates, Overhead
from .hardware import Hardware
from .profile import ModelProfile
from .solver import Placement

# Per layer held on a GPU: kernel launches of one decode step (~a dozen kernels of ~1 us each per layer).
GPU_TOKEN_PER_LAYER_S = 1.5e-5
# Prompt processing: sustained matmul FLOP/s per CPU thread (AVX2 FMA, llama.cpp's gemm) and per GPU as a
# multiple of its memory bandwidth (tensor-core FLOPs track bandwidth within ~2x across NVIDIA generations).
CPU_FLOPS_PER_THREAD = 30e9
PP_PER_TOKEN_S = 1.0e-4  # embeddings, norms, rope, attention of short prompts
GPU_FLOPS_PER_BYTE_PER_S = 80.0
PCIE_BANDWIDTH = 20e9  # copies of CPU weights to the GPU for big prompt batches (PCIe 4.0 x16, effective)
# measured (bench_streaming, AMX host, runs T and V): 0.168, 0.525-0.526 and 0.731-0.734 GiB read per token for
# 0.176, 0.523 and 0.723 GiB streamed: a fault or populate in a streamed layer reads the 2 MiB folio around it, so
# edges next to resident layers are read too; part of the read-ahead window is read ahead only when little streams
STREAM_READ_OVERHEAD = 1.02
# Measured with bench_streaming (F16, 0.93 GiB read per token, room = cgroup limit - ~0.15 GiB anonymous):
# raw mmap kept 0.21 of 0.75, 0.09 of 0.44 and 0.06 of 0.24 GiB across a token's sweep: about a quarter of the room.
MMAP_KEPT_FRACTION = 0.25


@dataclass(frozen=True)
class Speed:
    tokens_per_second: float
    prompt_tokens_per_second: float
    seconds_by_tier: dict[str, float]


def cpu_rates(hw: Hardware) -> CpuRates:
    """The machine's measured rates, or typical AVX2 ones when nothing was measured."""
    return hw.cpu_rates or TYPICAL_AVX2


def weights_per_s(rates: CpuRates, type_name: str, threads: int) -> float:
    """Weights/s of one type on `threads` threads: measured, else typical, else the slowest typical type."""
    r = rates.weights_per_s(type_name, threads)
    if r is None:
        r = TYPICAL_AVX2.weights_per_s(type_name, threads)
    return r if r is not None else TYPICAL_AVX2.speed(TYPICAL_OTHER, threads)


def cpu_bytes_per_s(profile: ModelProfile, rates: CpuRates, threads: int) -> float:
    """Weight bytes per second the CPU threads can multiply, over the model's mix of matrix types (by bytes)."""
    total = 0.0
    seconds = 0.0
    for t in profile.tensors:
        if t.kind in ("embd", "rope", "other") or len(t.shape) < 2:
            continue
        total += t.nbytes
        seconds += t.n_elements / weights_per_s(rates, t.ggml_type.name, threads)
    return total / seconds if seconds else float("inf")


def estimate(profile: ModelProfile, hw: Hardware, p: Placement, *, threads: int,
             context_tokens: int | None = None) -> Speed:
    """Tokens/s for generation with `context_tokens` already in the KV cache (default: half the context)."""
    fill = p.settings.n_ctx // 2 if context_tokens is None else min(context_tokens, p.settings.n_ctx)
    kv_frac = fill / p.settings.n_ctx if p.settings.n_ctx else 0.0
    rates = cpu_rates(hw)
    over: Overhead = rates.overhead(threads)
    tiers: dict[str, float] = {}
    cpu = next(d for d in p.devices if d.kind == "cpu")
    gpus = [d for d in p.devices if d.kind == "gpu"]
    accel = [d for d in p.devices if d.kind in ("rpc", "gpu")]  # the order of p.gpu_weights_read
    remote_cpus = {dev.name for w in hw.rpc_workers for dev in w.devices if dev.is_cpu}
    for d, read in zip(accel, p.gpu_weights_read):
        layers = d.layers + d.attn_layers
        if not (read or d.kv_bytes):
            continue
        memory_s = (read + d.kv_bytes * kv_frac) / d.bandwidth
        if d.name in remote_cpus:  # a worker's CPU: like this one, memory or its dot products, whichever is slower
            tiers[d.name] = max(memory_s, read / cpu_bytes_per_s(profile, rates, threads)) + layers * over.per_layer_s
        else:
            tiers[d.name] = memory_s + layers * GPU_TOKEN_PER_LAYER_S
    stretches = network_stretches(p, hw)
    if stretches:
        mask = memory.pad_ctx(max(1, fill)) * (2 if p.settings.flash_attn else 4)
        tiers["network"] = rpc.network_seconds(stretches, profile.n_embd, profile.n_vocab, mask)
    cpu_bytes = p.cpu_weights_read + cpu.kv_bytes * kv_frac
    if cpu_bytes:
        memory_s = cpu_bytes / hw.ram_bandwidth
        compute_s = p.cpu_weights_read / cpu_bytes_per_s(profile, rates, threads)
        cpu_layers = cpu.layers + sum(d.attn_layers for d in gpus)
        tiers["CPU"] = max(memory_s, compute_s) + cpu_layers * over.per_layer_s
    if p.disk_stream_bytes:
        # corral's streaming engine reads the streamed layers ahead while the CPU multiplies the others: the CPU
        # multiplies the streamed weights too, and the disk costs only the time compute does not hide, plus the
        # time it waits while resident layers compute with its read-ahead room full
        resident_s = tiers.get("CPU", 0.0)
        streamed_s = p.disk_stream_bytes / cpu_bytes_per_s(profile, rates, threads)
        tiers["CPU"] = resident_s + streamed_s
        idle = stream_idle_seconds(profile, p.cpu_weights_read, p.disk_stream_bytes, resident_s, hw.disk_bandwidth)
        tiers["disk"] = max(0.0, disk_read_seconds(p.disk_stream_bytes, hw) + idle - tiers["CPU"])
    tiers["fixed"] = over.fixed_s + over.per_vocab_s * profile.n_vocab
    per_token = sum(tiers.values())

    # prompt processing, per token of a big batch: the output head runs for the last token only
    flops_per_weight = 2.0 * _layer_fraction(profile)
    weights_per_byte = _weights_per_byte(profile)
    gpu_s = 0.0
    for d, read in zip(accel, p.gpu_weights_read):
        if d.name in remote_cpus:
            gpu_s += flops_per_weight * (read * weights_per_byte) / (max(1, threads) * CPU_FLOPS_PER_THREAD)
        else:
            gpu_s += flops_per_weight * (read * weights_per_byte) / (d.bandwidth * GPU_FLOPS_PER_BYTE_PER_S)
    gpu_s += rpc.prompt_network_seconds(stretches, profile.n_embd, p.settings.n_ubatch)
    cpu_weights = p.cpu_weights_read * weights_per_byte
    if gpus:  # big batches of CPU weights run on the GPU after a PCIe copy, once per ubatch
        pp_cpu = (p.cpu_weights_read / PCIE_BANDWIDTH) / max(1, p.settings.n_ubatch)
        pp_cpu += flops_per_weight * cpu_weights / (gpus[0].bandwidth * GPU_FLOPS_PER_BYTE_PER_S)
    else:
        pp_cpu = flops_per_weight * cpu_weights / (max(1, threads) * CPU_FLOPS_PER_THREAD)
    pp_disk = (p.disk_stream_bytes / hw.disk_bandwidth) / max(1, p.settings.n_ubatch)
    pp = PP_PER_TOKEN_S + gpu_s + pp_cpu + pp_disk + over.per_layer_s * profile.n_layer / max(1, p.settings.n_ubatch)
    return Speed(1.0 / per_token, 1.0 / pp if pp > 0 else 0.0, tiers)


def network_stretches(p: Placement, hw: Hardware) -> list[tuple[rpc.RpcLink, bool]]:
    """The runs of layers on RPC workers' devices in compute order, each with its link and whether it ends with
    the output layer (the last device that holds anything holds the output when it is off the CPU)."""
    accel = [d for d in p.devices if d.kind in ("rpc", "gpu")]
    used = [d for d in accel if d.weights_bytes]
    if not any(d.kind == "rpc" for d in used):
        return []
    links = {w.endpoint: w.link for w in hw.rpc_workers}
    last = used[-1].name if p.output_on_gpu else None
    return [(links[d.endpoint], d.name == last) for d in used if d.kind == "rpc"]


def stream_idle_seconds(profile: ModelProfile, resident: int, streamed: int, resident_s: float, speed: float) -> float:
    """Seconds a token the disk waits while the streaming engine runs: it spreads the streamed slices over the token
    (offload.memory.stream_slices), and while the resident layers between two of them compute (`resident_s` in all)
    it reads ahead only as far as its room (offload.memory.stream_window) holds: as many stretches as slices, each
    hiding one room's read. With whole layers streamed, measured on a 2.8 GiB BF16 model at file/limit 1.27: 0.207 s
    a token where 0.29 GiB at the disk's 1.9 GB/s is 0.16 s and compute 0.10 s."""
    units = profile.n_layer + 1
    unit = (resident + streamed) // units
    if not unit or speed <= 0:
        return 0.0
    room = memory.stream_window(memory.largest_stream_step(profile.tensors) or unit, resident + streamed, streamed)
    stretches = memory.stream_slices(streamed, units, room)
    return max(0.0, resident_s - stretches * room / speed)


def disk_read_seconds(streamed: int, hw: Hardware) -> float:
    """Seconds per token to read the streamed weights: what the streaming engine reads (the streamed part, plus
    ~2% the kernel's 2 MiB folios fetch at its edges, measured) at the disk's speed (measured by earlier streaming
    runs' reads, else a cold sequential read)."""
    return streamed * STREAM_READ_OVERHEAD / hw.disk_bandwidth


def mmap_read_bytes(per_token: int, room: int) -> int:
    """Bytes plain mmap (llama.cpp without corral's streaming) reads from disk per token when `per_token` bytes
    of weights are swept once per token through `room` bytes of page cache. A cyclic sweep larger than an LRU
    cache misses on every page; the kernel's active list shields only part of the room from the sweep.
    MMAP_KEPT_FRACTION is that part, measured (bench/bench_streaming.py, BENCHMARKS.md)."""
    if per_token <= room:
        return 0
    return int(per_token - MMAP_KEPT_FRACTION * max(0, room))


def _layer_fraction(profile: ModelProfile) -> float:
    """Share of the per-token matrix bytes that are repeating layers (the rest is the output head)."""
    layers = sum(t.nbytes for t in profile.tensors if t.layer is not None and len(t.shape) >= 2)
    head = sum(t.nbytes for t in profile.tensors if t.kind == "output")
    if not head and profile.tie_embeddings:
        head = sum(t.nbytes for t in profile.tensors if t.kind == "embd")
    return layers / (layers + head) if layers + head else 1.0


def _weights_per_byte(profile: ModelProfile) -> float:
    matrices = [t for t in profile.tensors if len(t.shape) >= 2 and t.kind != "embd"]
    b = sum(t.nbytes for t in matrices)
    return sum(t.n_elements for t in matrices) / b if b else 1.0
