"""Known GPUs (memory and bandwidth from vendor spec sheets) and parsing of what-if sizes and rates."""

from __future__ import annotations

import re
from dataclasses import dataclass

from corral.convert.errors import UsageError
from corral.convert.units import GiB, format_bytes, is_size, parse_rate, parse_size


@dataclass(frozen=True)
class KnownGPU:
    """A card's published memory size and peak memory bandwidth."""

    key: str
    name: str
    memory_bytes: int
    bandwidth: float  # bytes/s
    aliases: tuple[str, ...] = ()


def _card(key: str, name: str, mem_gib: float, bw_gbs: float, *aliases: str) -> KnownGPU:
    return KnownGPU(key, name, int(mem_gib * GiB), bw_gbs * 1e9, aliases)


# Vendor spec sheets (NVIDIA product pages): memory size, peak DRAM bandwidth in GB/s.
KNOWN_GPUS: tuple[KnownGPU, ...] = (
    _card("rtx3060", "GeForce RTX 3060", 12, 360, "3060"),
    _card("rtx3080", "GeForce RTX 3080", 10, 760, "3080"),
    _card("rtx3090", "GeForce RTX 3090", 24, 936, "3090"),
    _card("rtx3090ti", "GeForce RTX 3090 Ti", 24, 1008, "3090 ti"),
    _card("rtx4060ti", "GeForce RTX 4060 Ti", 16, 288, "4060 ti"),
    _card("rtx4070", "GeForce RTX 4070", 12, 504, "4070"),
    _card("rtx4070ti", "GeForce RTX 4070 Ti", 12, 504, "4070 ti"),
    _card("rtx4080", "GeForce RTX 4080", 16, 717, "4080"),
    _card("rtx4090", "GeForce RTX 4090", 24, 1008, "4090"),
    _card("rtx5080", "GeForce RTX 5080", 16, 960, "5080"),
    _card("rtx5090", "GeForce RTX 5090", 32, 1792, "5090"),
    _card("a4000", "RTX A4000", 16, 448, "rtx a4000"),
    _card("a5000", "RTX A5000", 24, 768, "rtx a5000"),
    _card("a6000", "RTX A6000", 48, 768, "rtx a6000"),
    _card("rtx6000ada", "RTX 6000 Ada Generation", 48, 960, "rtx 6000 ada"),
    _card("l4", "L4", 24, 300),
    _card("l40s", "L40S", 48, 864),
    _card("t4", "Tesla T4", 16, 320, "tesla t4"),
    _card("v100", "Tesla V100-SXM2-32GB", 32, 900, "tesla v100"),
    _card("a10", "A10", 24, 600, "nvidia a10"),
    _card("a100-40g", "A100-SXM4-40GB", 40, 1555, "a100 40gb", "a100-sxm4-40gb", "a100-pcie-40gb"),
    _card("a100-80g", "A100-SXM4-80GB", 80, 2039, "a100 80gb", "a100-sxm4-80gb", "a100 80gb pcie", "a100-80gb"),
    _card("h100-pcie", "H100 PCIe", 80, 2000, "h100 pcie"),
    _card("h100", "H100 80GB HBM3", 80, 3350, "h100-sxm", "h100 80gb hbm3", "h100 sxm"),
    _card("h200", "H200", 141, 4800, "h200 nvl"),
)


def find_gpu(text: str) -> KnownGPU | None:
    """Match a card key ('rtx4090') or an NVML name ('NVIDIA GeForce RTX 4090') to a known card."""
    norm = _norm(text)
    for card in KNOWN_GPUS:
        if norm == _norm(card.key) or norm in (_norm(a) for a in card.aliases):
            return card
    # NVML names: longest matching name/alias wins ("RTX 3090 Ti" before "RTX 3090")
    best: tuple[int, KnownGPU] | None = None
    for card in KNOWN_GPUS:
        for cand in (card.name, *card.aliases):
            c = _norm(cand)
            if len(c) >= 2 and c in norm and (best is None or len(c) > best[0]):
                best = (len(c), card)
    return best[1] if best else None


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower().replace("nvidia", "").replace("geforce", ""))


@dataclass(frozen=True)
class GPUSpec:
    """A what-if GPU: memory and bandwidth (None: unknown, assume a typical card)."""

    name: str
    memory_bytes: int
    bandwidth: float | None


def parse_gpu_spec(text: str) -> GPUSpec:
    """'24GiB', '24GiB@1008GB/s', 'rtx4090' or 'h100' -> GPUSpec."""
    s = text.strip()
    card = find_gpu(s) if not is_size(s.split("@")[0]) else None
    if card is not None:
        return GPUSpec(card.name, card.memory_bytes, card.bandwidth)
    size_text, _, rate_text = s.partition("@")
    try:
        size = parse_size(size_text)
    except UsageError:
        keys = ", ".join(c.key for c in KNOWN_GPUS)
        raise UsageError(f"unknown GPU {text!r}: give a size like 24GiB[@1008GB/s] or one of {keys}") from None
    if size <= 0:
        raise UsageError(f"GPU memory must be positive: {text!r}")
    rate = parse_rate(rate_text) if rate_text else None
    return GPUSpec(f"GPU {format_bytes(size)}", size, rate)
