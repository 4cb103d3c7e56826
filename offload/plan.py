"""The Plan: a frozen value saying where every tensor goes, what fits, how fast, and how to load it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class DevicePlan:
    """Bytes on one device: a GPU (GPU0, GPU1, ...), the CPU's RAM, or the disk (streamed through mmap)."""

    name: str
    kind: str  # "gpu" | "cpu" | "disk"
    label: str  # card / CPU model / "mmap from disk"
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    capacity_bytes: int
    bandwidth: float  # bytes/s
    layers: int = 0  # whole repeating layers (attention-only layers counted in attn_layers)
    attn_layers: int = 0
    repack_bytes: int = 0  # CPU: repacked copies (part of weights_bytes, never evictable)
    output_bytes: int = 0  # CPU: llama.cpp's logits buffer (part of overhead_bytes)
    mapped_range_bytes: int = 0  # CPU: the CPU_Mapped buffer llama.cpp logs (file range, gaps included)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.kind == "disk" or self.total_bytes <= self.capacity_bytes

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_bytes"] = self.total_bytes
        data["fits"] = self.fits
        return data


@dataclass(frozen=True)
class Plan:
    """A complete offload plan for one model on one machine with one set of options."""

    model: str
    model_path: str | None
    source: str  # gguf | hf | catalog
    quant: str
    file_bytes: int
    n_params: int
    fits: bool
    why: str  # empty when it fits
    n_ctx: int
    n_ctx_train: int
    n_gpu_layers: int
    n_layers: int  # repeating layers + 1 (the output layer), llama.cpp's count for n_gpu_layers
    kv_type: str
    flash_attn: bool
    n_batch: int
    n_ubatch: int
    n_threads: int
    use_extra_bufts: bool  # CPU weight repacking (llama_model_params.use_extra_bufts)
    tensor_split: tuple[float, ...]
    tensor_overrides: tuple[tuple[str, str], ...]
    llama_kwargs: dict[str, Any]
    llama_cli_args: list[str]
    tokens_per_second: float
    prompt_tokens_per_second: float
    disk_stream_bytes: int  # weights re-read from disk for every generated token
    devices: tuple[DevicePlan, ...]
    warnings: tuple[str, ...]
    advice: tuple[str, ...]
    headline: str
    hardware_source: str = "detected"
    time_per_token: dict[str, float] = field(default_factory=dict)  # seconds by tier

    def device(self, name: str) -> DevicePlan | None:
        return next((d for d in self.devices if d.name == name), None)

    @property
    def gpu_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices if d.kind == "gpu")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["devices"] = [d.to_json() for d in self.devices]
        data["tensor_split"] = list(self.tensor_split)
        data["tensor_overrides"] = [list(x) for x in self.tensor_overrides]
        data["warnings"] = list(self.warnings)
        data["advice"] = list(self.advice)
        return data
