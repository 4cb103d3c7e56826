"""LoadSettings: how llama.cpp loads one model, as the planner decides it and the engine applies it.

The planner produces one `LoadSettings` per plan (`Plan.load`); the runtime applies the user's flags to it
(a new value, never an edit) and fills llama.cpp's parameter structs from it. The `Llama(**kwargs)` mapping
and the llama.cpp command-line flags are both derived from it, so all three always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.convert.errors import UsageError

from . import memory

# llama.h: enum llama_split_mode
SPLIT_MODES: dict[str, int] = {"none": 0, "layer": 1, "row": 2}


def kv_needs_flash_attn(kv_type: str) -> bool:
    """llama.cpp refuses a quantized V cache without flash attention (llama-context.cpp tests
    ggml_is_quantized(type_v)); the float types f32, f16 and bf16 work either way."""
    return memory.kv_is_quantized(kv_type)


def resolve_flash_attn(kv_type: str, flash_attn: bool | None, *, default: bool = True) -> bool:
    """Flash attention for a `kv_type` cache: `flash_attn` as asked (None: `default`, or on when the cache
    type needs it); asking for it off with a quantized cache is a UsageError."""
    needs = kv_needs_flash_attn(kv_type)
    if flash_attn is None:
        return default or needs
    if needs and not flash_attn:
        raise UsageError(f"a {kv_type} KV cache needs flash attention (llama.cpp refuses a quantized V cache "
                         "without it)")
    return flash_attn


@dataclass(frozen=True)
class LoadSettings:
    """llama.cpp's model and context parameters for one load (names as llama-cpp-python's `Llama` takes them)."""

    n_ctx: int  # 0 = the model's training context
    n_gpu_layers: int  # -1 = all
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_threads_batch: int
    kv_type: str = "f16"  # a name from memory.KV_TYPES, used for both K and V
    flash_attn: bool = True
    use_mmap: bool = True
    use_mlock: bool = False
    use_extra_bufts: bool = True  # CPU weight repacking (llama_model_params.use_extra_bufts)
    tensor_split: tuple[float, ...] = ()  # layers per GPU; empty = llama.cpp decides
    main_gpu: int = 0
    split_mode: str = "layer"  # a key of SPLIT_MODES
    tensor_overrides: tuple[tuple[str, str], ...] = ()  # (tensor name regex, device name)
    rpc_servers: tuple[str, ...] = ()  # RPC worker endpoints ("HOST:PORT") to register before loading
    devices: tuple[str, ...] = ()  # ggml device names in tensor_split's order; empty = llama.cpp's defaults

    def __post_init__(self) -> None:
        memory.kv_type(self.kv_type)
        if self.kv_type != self.kv_type.lower():
            raise ValueError(f"kv_type must be lower case, got {self.kv_type!r}")
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"unknown split mode {self.split_mode!r}")
        if self.n_ctx < 0 or min(self.n_batch, self.n_ubatch, self.n_threads, self.n_threads_batch) < 1:
            raise ValueError(f"invalid load settings: {self}")

    @property
    def kv_type_id(self) -> int:
        """The GGML type id of the K and V caches (llama_context_params.type_k / type_v)."""
        return int(memory.kv_type(self.kv_type))

    @property
    def split_mode_id(self) -> int:
        return SPLIT_MODES[self.split_mode]

    @property
    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for llama-cpp-python's `Llama(model_path, **kwargs)` (a new dict each time).
        `Llama` has no parameter for repacking or tensor overrides: see `use_extra_bufts`, `tensor_overrides`."""
        kwargs: dict[str, Any] = {
            "n_ctx": self.n_ctx, "n_gpu_layers": self.n_gpu_layers, "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch, "n_threads": self.n_threads, "n_threads_batch": self.n_threads_batch,
            "type_k": self.kv_type_id, "type_v": self.kv_type_id, "flash_attn": self.flash_attn,
            "use_mmap": self.use_mmap, "use_mlock": self.use_mlock,
        }
        if self.tensor_split:
            kwargs.update(tensor_split=list(self.tensor_split), main_gpu=self.main_gpu,
                          split_mode=self.split_mode_id)
        return kwargs

    def cli_args(self, model_path: str | None = None) -> list[str]:
        """The same settings as llama.cpp command-line flags (llama-cli, llama-server)."""
        cli = [*(["-m", model_path] if model_path else []), "-c", str(self.n_ctx), "-ngl", str(self.n_gpu_layers),
               "-b", str(self.n_batch), "-ub", str(self.n_ubatch), "-t", str(self.n_threads),
               "-tb", str(self.n_threads_batch), "-fa", "on" if self.flash_attn else "off"]
        if self.kv_type != "f16":
            cli += ["-ctk", self.kv_type, "-ctv", self.kv_type]
        if self.rpc_servers:
            cli += ["--rpc", ",".join(self.rpc_servers)]
        if self.devices:
            cli += ["-dev", ",".join(self.devices)]
        if self.tensor_split:
            cli += ["-sm", self.split_mode, "-mg", str(self.main_gpu),
                    "-ts", ",".join(str(int(x)) if x == int(x) else str(x) for x in self.tensor_split)]
        for regex, device in self.tensor_overrides:
            cli += ["-ot", f"{regex}={device}"]
        if not self.use_extra_bufts:
            cli.append("--no-repack")
        if not self.use_mmap:
            cli.append("--no-mmap")
        if self.use_mlock:
            cli.append("--mlock")
        return cli
