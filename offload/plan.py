"""The Plan: a frozen value saying where every tensor goes, what fits, how fast, and how to load it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .load_settings import LoadSettings


@dataclass(frozen=True)
class DevicePlan:
    """Bytes on one device: a GPU (GPU0, GPU1, ...), an RPC worker's device (RPC0, RPC1, ... as ggml names
    them), the CPU's RAM, or the disk (streamed through mmap)."""

    name: str
    kind: str  # "gpu" | "rpc" | "cpu" | "disk"
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
    amx_bytes: int = 0  # CPU: llama.cpp's AMX buffer (part of weights_bytes, never evictable)
    endpoint: str = ""  # an RPC device: its worker's HOST:PORT

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
    n_ctx_train: int
    n_layers: int  # repeating layers + 1 (the output layer), llama.cpp's count for n_gpu_layers
    load: LoadSettings  # how llama.cpp is to load it
    tokens_per_second: float
    prompt_tokens_per_second: float
    disk_stream_bytes: int  # weights re-read from disk for every generated token
    devices: tuple[DevicePlan, ...]
    warnings: tuple[str, ...]
    advice: tuple[str, ...]
    headline: str
    hardware_source: str = "detected"
    ram_limit: str = "machine"  # what bounds the RAM the plan uses (Hardware.ram_limit)
    time_per_token: dict[str, float] = field(default_factory=dict)  # seconds by tier
    draft: Plan | None = None  # the draft model's own plan (speculative decoding)
    speculative: Any = None  # offload.speculation.SpeculativeEstimate with a draft

    def device(self, name: str) -> DevicePlan | None:
        return next((d for d in self.devices if d.name == name), None)

    @property
    def gpu_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices if d.kind == "gpu")

    # the load settings under the names the plan has always had
    @property
    def n_ctx(self) -> int:
        return self.load.n_ctx

    @property
    def n_gpu_layers(self) -> int:
        return self.load.n_gpu_layers

    @property
    def kv_type(self) -> str:
        return self.load.kv_type

    @property
    def flash_attn(self) -> bool:
        return self.load.flash_attn

    @property
    def n_batch(self) -> int:
        return self.load.n_batch

    @property
    def n_ubatch(self) -> int:
        return self.load.n_ubatch

    @property
    def n_threads(self) -> int:
        return self.load.n_threads

    @property
    def use_extra_bufts(self) -> bool:
        return self.load.use_extra_bufts

    @property
    def tensor_split(self) -> tuple[float, ...]:
        return self.load.tensor_split

    @property
    def tensor_overrides(self) -> tuple[tuple[str, str], ...]:
        return self.load.tensor_overrides

    @property
    def llama_kwargs(self) -> dict[str, Any]:
        """`Llama(model_path, **plan.llama_kwargs)` for llama-cpp-python users."""
        return self.load.llama_kwargs

    @property
    def llama_cli_args(self) -> list[str]:
        """The plan as llama.cpp command-line flags (with -m when the model is a file)."""
        return self.load.cli_args(self.model_path)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "model_path": self.model_path, "source": self.source, "quant": self.quant,
            "file_bytes": self.file_bytes, "n_params": self.n_params, "fits": self.fits, "why": self.why,
            "n_ctx": self.n_ctx, "n_ctx_train": self.n_ctx_train, "n_gpu_layers": self.n_gpu_layers,
            "n_layers": self.n_layers, "kv_type": self.kv_type, "flash_attn": self.flash_attn,
            "n_batch": self.n_batch, "n_ubatch": self.n_ubatch, "n_threads": self.n_threads,
            "use_extra_bufts": self.use_extra_bufts, "tensor_split": list(self.tensor_split),
            "tensor_overrides": [list(x) for x in self.tensor_overrides], "llama_kwargs": self.llama_kwargs,
            "llama_cli_args": self.llama_cli_args, "tokens_per_second": self.tokens_per_second,
            "prompt_tokens_per_second": self.prompt_tokens_per_second, "disk_stream_bytes": self.disk_stream_bytes,
            "devices": [d.to_json() for d in self.devices], "warnings": list(self.warnings),
            "advice": list(self.advice), "headline": self.headline, "hardware_source": self.hardware_source,
            "ram_limit": self.ram_limit,
            "time_per_token": dict(self.time_per_token),
            **({"draft": self.draft.to_json(), "speculative": self.speculative.to_json()} if self.draft else {}),
        }
