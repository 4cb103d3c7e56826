"""Predicted speed: decode is memory-bandwidth bound (bytes per tier / that tier's bandwidth), prompt processing
is compute bound; both with constants calibrated against llama.cpp on real hardware (bench/bench_plan.py)."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType

from .hardware import Hardware
from .profile import ModelProfile
from .solver import Placement

T = GGMLQuantizationType

# CPU matrix-vector throughput per thread (weights/s) of llama.cpp's AVX2 kernels, by weight type. Decode on
# the CPU runs at min(RAM bandwidth, threads x this): on few cores the dequantizing dot products are the
# limit, on many the memory is. Calibrated with bench/bench_plan.py (miniature models, 2-core AVX2 VM).
# The relative speeds of the types come from llama.cpp's kernels; the overall scale was fitted on an idle
# machine (an earlier fit under CPU contention read 3.2x too slow).
_RATE_SCALE = 3.2
CPU_WEIGHTS_PER_S: dict[GGMLQuantizationType, float] = {
    t: r * _RATE_SCALE
    for t, r in {
        T.F32: 2.0e9, T.F16: 3.0e9, T.BF16: 3.0e9, T.Q8_0: 4.5e9, T.Q4_0: 5.0e9, T.Q4_K: 5.0e9, T.Q5_K: 4.0e9,
        T.Q6_K: 4.5e9, T.Q3_K: 3.0e9, T.Q2_K: 3.0e9, T.IQ4_XS: 3.5e9, T.IQ4_NL: 4.0e9,
    }.items()
}
DEFAULT_CPU_WEIGHTS_PER_S = 2.0e9 * _RATE_SCALE  # IQ1/IQ2/IQ3 codebook types and anything unlisted
RAM_EFFICIENCY = 0.8  # fraction of measured read bandwidth llama.cpp's threads reach on big models
# Per generated token outside the weights: graph build, llama-cpp-python's logits copy and sampling
# (proportional to the vocabulary), per-layer kernel launches. Calibrated like the above.
TOKEN_FIXED_S = 1.05e-3
TOKEN_PER_VOCAB_S = 0.7e-8
TOKEN_PER_LAYER_S = 4.2e-5
GPU_TOKEN_PER_LAYER_S = 1.5e-5
# Prompt processing: sustained matmul FLOP/s per CPU thread (AVX2 FMA, llama.cpp's gemm) and per GPU as a
# multiple of its memory bandwidth (tensor-core FLOPs track bandwidth within ~2x across NVIDIA generations).
CPU_FLOPS_PER_THREAD = 30e9
PP_PER_TOKEN_S = 1.0e-4  # embeddings, norms, rope, attention of short prompts
GPU_FLOPS_PER_BYTE_PER_S = 80.0
PCIE_BANDWIDTH = 20e9  # copies of CPU weights to the GPU for big prompt batches (PCIe 4.0 x16, effective)


@dataclass(frozen=True)
class Speed:
    tokens_per_second: float
    prompt_tokens_per_second: float
    seconds_by_tier: dict[str, float]


def _cpu_compute_rate(profile: ModelProfile, hw: Hardware, threads: int) -> float:
    """Weights per second the CPU threads can multiply, averaged over the model's type mix (by bytes)."""
    total = 0.0
    time = 0.0
    for t in profile.tensors:
        if t.kind in ("embd", "rope", "other") or len(t.shape) < 2:
            continue
        total += t.nbytes
        time += t.n_elements / (threads * CPU_WEIGHTS_PER_S.get(t.ggml_type, DEFAULT_CPU_WEIGHTS_PER_S))
    return total / time if time else hw.ram_bandwidth  # bytes per second


def estimate(profile: ModelProfile, hw: Hardware, p: Placement, *, threads: int,
             context_tokens: int | None = None) -> Speed:
    """Tokens/s for generation with `context_tokens` already in the KV cache (default: half the context)."""
    fill = p.settings.n_ctx // 2 if context_tokens is None else min(context_tokens, p.settings.n_ctx)
    kv_frac = fill / p.settings.n_ctx if p.settings.n_ctx else 0.0
    tiers: dict[str, float] = {}
    cpu = next(d for d in p.devices if d.kind == "cpu")
    gpus = [d for d in p.devices if d.kind == "gpu"]
    for d, read in zip(gpus, p.gpu_weights_read):
        layers = d.layers + d.attn_layers
        if read or d.kv_bytes:
            tiers[d.name] = (read + d.kv_bytes * kv_frac) / d.bandwidth + layers * GPU_TOKEN_PER_LAYER_S
    cpu_bytes = p.cpu_weights_read + cpu.kv_bytes * kv_frac
    if cpu_bytes:
        mem_rate = hw.ram_bandwidth * RAM_EFFICIENCY
        rate = min(mem_rate, _cpu_compute_rate(profile, hw, threads))
        tiers["CPU"] = cpu_bytes / rate + (cpu.layers + sum(d.attn_layers for d in gpus)) * TOKEN_PER_LAYER_S
    if p.disk_stream_bytes:
        tiers["disk"] = p.disk_stream_bytes / hw.disk_bandwidth
    tiers["fixed"] = TOKEN_FIXED_S + TOKEN_PER_VOCAB_S * profile.n_vocab
    per_token = sum(tiers.values())

    # prompt processing, per token of a big batch: the output head runs for the last token only
    flops_per_weight = 2.0 * _layer_fraction(profile)
    weights_per_byte = _weights_per_byte(profile)
    gpu_s = 0.0
    for d, read in zip(gpus, p.gpu_weights_read):
        gpu_s += flops_per_weight * (read * weights_per_byte) / (d.bandwidth * GPU_FLOPS_PER_BYTE_PER_S)
    cpu_weights = p.cpu_weights_read * weights_per_byte
    if gpus:  # big batches of CPU weights run on the GPU after a PCIe copy, once per ubatch
        pp_cpu = (p.cpu_weights_read / PCIE_BANDWIDTH) / max(1, p.settings.n_ubatch)
        pp_cpu += flops_per_weight * cpu_weights / (gpus[0].bandwidth * GPU_FLOPS_PER_BYTE_PER_S)
    else:
        pp_cpu = flops_per_weight * cpu_weights / (max(1, threads) * CPU_FLOPS_PER_THREAD)
    pp_disk = (p.disk_stream_bytes / hw.disk_bandwidth) / max(1, p.settings.n_ubatch)
    pp = PP_PER_TOKEN_S + gpu_s + pp_cpu + pp_disk + TOKEN_PER_LAYER_S * profile.n_layer / max(1, p.settings.n_ubatch)
    return Speed(1.0 / per_token, 1.0 / pp if pp > 0 else 0.0, tiers)


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
