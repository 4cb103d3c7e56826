"""Getting ready to load: the model path, the offload plan, and the plan's load settings with the user's flags.

Light on purpose (no llama_cpp at import): the CLI's shared flags build `EngineOptions` from here, and
`corral --help` must not pay for loading llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.convert.errors import InputNotFound, UsageError
from corral.offload import memory
from corral.offload.load_settings import LoadSettings, resolve_flash_attn
from corral.offload.rpc import RpcWorker, check_unique, with_memory_bandwidth

if TYPE_CHECKING:
    from corral.convert.gguf_file import GGUFModelFile
    from corral.offload.plan import Plan


@dataclass(frozen=True)
class EngineOptions:
    """User overrides on top of the plan (None = the plan decides)."""

    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    kv_type: str | None = None
    force: bool = False
    verbose: bool = False
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    draft: str | None = None  # a draft model for speculative decoding (GGUF path or name)
    draft_max: int = 8  # most tokens drafted per step
    rpc: tuple[str, ...] = ()  # RPC worker endpoints (HOST:PORT) the plan may place layers on
    rpc_memory_bandwidth: float | None = None  # bytes/s the workers' devices read at (None: offload.rpc's guess)


def resolve_model_path(model: str | Path) -> Path:
    """A GGUF path as given, or a file/folder name under corral's models directory."""
    path = Path(model).expanduser()
    if not path.exists():
        from corral.app.locations import data_dir

        for candidate in (data_dir() / "models" / str(model), data_dir() / "models" / f"{model}.gguf"):
            if candidate.exists():
                path = candidate
                break
        else:
            raise InputNotFound(f"model file not found: {model}", path=None)
    if path.is_dir():
        ggufs = sorted(p for p in path.glob("*.gguf") if "-of-" not in p.name or "-00001-of-" in p.name)
        if len(ggufs) != 1:
            raise UsageError(f"{path}: expected one .gguf model in the folder, found {len(ggufs)}")
        path = ggufs[0]
    return path


def make_plan(path: Path, options: EngineOptions, model_file: GGUFModelFile | None = None) -> Plan:
    """The planner's offload plan for `path` with the user's flags (--ctx 0 = the model's full context)."""
    from corral.offload.api import PlanOptions, plan_model

    n_ctx = options.n_ctx
    if n_ctx == 0:
        n_ctx = int(model_file.arch_key("{arch}.context_length", 0) or 0) if model_file is not None else 0
    plan_options = PlanOptions(n_ctx=n_ctx or None, kv_type=options.kv_type or "f16", n_threads=options.n_threads,
                               n_gpu_layers=options.n_gpu_layers, draft=str(resolve_model_path(options.draft)) if options.draft else None,
                               draft_max=options.draft_max)
    hardware = None
    if options.rpc:
        from corral.offload.hardware import detect_hardware

        hardware = replace(detect_hardware(path),
                           rpc_workers=probe_workers(options.rpc, options.rpc_memory_bandwidth))
    return plan_model(path, plan_options, hardware)


def probe_workers(endpoints: Sequence[str], memory_bandwidth: float | None = None) -> tuple[RpcWorker, ...]:
    """Ask each RPC worker for its devices and free memory and measure the link to it (registers the workers'
    devices in this process, as loading needs them); `memory_bandwidth` for devices whose speed is unknown."""
    if not endpoints:
        return ()
    from corral.app.runtime import rpc as worker_rpc

    workers = tuple(worker_rpc.probe(endpoint) for endpoint in check_unique(endpoints))
    return with_memory_bandwidth(workers, memory_bandwidth) if memory_bandwidth else workers


def apply_options(settings: LoadSettings, options: EngineOptions) -> LoadSettings:
    """The plan's load settings with the user's flags on top (a flag left at None keeps the plan's value).

    --threads sets both thread counts; --kv-type turns flash attention on when the cache type needs it."""
    changes: dict[str, Any] = {}
    if options.n_ctx is not None:
        changes["n_ctx"] = options.n_ctx
    if options.n_threads is not None:
        changes["n_threads"] = changes["n_threads_batch"] = options.n_threads
    if options.n_gpu_layers is not None:
        changes["n_gpu_layers"] = options.n_gpu_layers
    if options.use_mmap is not None:
        changes["use_mmap"] = options.use_mmap
    if options.use_mlock is not None:
        changes["use_mlock"] = options.use_mlock
    if options.kv_type is not None:
        kv_type = memory.kv_type(options.kv_type).name.lower()
        changes["kv_type"] = kv_type
        changes["flash_attn"] = resolve_flash_attn(kv_type, None, default=settings.flash_attn)
    return replace(settings, **changes)


def checked_on_this_cpu(plan: Plan, settings: LoadSettings, model_file: GGUFModelFile,
                        path: Path) -> tuple[LoadSettings, str | None]:
    """A plan made for other hardware (a file, a what-if, a test's machine) did not ask this CPU's probe: an
    extra buffer that is broken here (AMX kernels that segfault on some hosts) would take the process down on
    the first decode, so it is turned off, with a warning. Plans made here were checked already."""
    if not settings.use_extra_bufts or plan.hardware_source == "detected" or any(
            d.kind in ("gpu", "rpc") for d in plan.devices):
        return settings, None
    from corral.offload.cpu_probe import broken_on_this_cpu
    from corral.offload.profile import profile_of

    broken = broken_on_this_cpu(profile_of(model_file, path))
    if not broken:
        return settings, None
    return replace(settings, use_extra_bufts=False), (
        f"extra CPU buffers off: {', '.join(sorted(broken))} failed this CPU's probe (see `corral info --hardware`)")


def last_log_line(lines: Sequence[str]) -> str | None:
    """The most telling line of a llama.cpp log excerpt: the last error-ish one, else the last one."""
    keywords = ("error", "failed", "unable", "cannot", "does not", "not supported", "invalid", "out of memory")
    for line in reversed(lines):
        if any(k in line.lower() for k in keywords):
            return line.strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), None)


def does_not_fit_message(plan: Plan) -> str:
    """The refusal for a plan that does not fit: why, the plan's advice, and how to insist."""
    advice = " ".join(a.rstrip(".") + "." for a in plan.advice)
    reason = plan.why or plan.headline or "the plan says it needs more than RAM + VRAM + disk streaming can give"
    return f"the model will not fit: {reason}. {advice} Pass --force to try anyway.".replace("..", ".").replace(".  ", ". ")
