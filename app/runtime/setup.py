"""Getting ready to load: the model path, the offload plan, and the plan's kwargs with the user's flags applied.

Light on purpose (no llama_cpp, gguf or numpy at import): the CLI's shared flags build `EngineOptions`
from here, and `corral --help` must not pay for loading llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.convert.errors import InputNotFound, UsageError


@dataclass(frozen=True)
class EngineOptions:
    """User overrides on top of the plan (None = the plan decides)."""

    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    kv_type: str = "f16"
    force: bool = False
    verbose: bool = False
    use_mmap: bool | None = None
    use_mlock: bool | None = None


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


def make_plan(path: Path, options: EngineOptions, model_file: Any = None) -> Any:
    """The planner's offload plan for `path` with the user's flags (--ctx 0 = the model's full context)."""
    from corral.offload.api import PlanOptions, plan_model

    n_ctx = options.n_ctx
    if n_ctx == 0:
        n_ctx = int(model_file.arch_key("{arch}.context_length", 0) or 0) if model_file is not None else 0
    plan_options = PlanOptions(n_ctx=n_ctx or None, kv_type=options.kv_type or "f16", n_threads=options.n_threads,
                               n_gpu_layers=options.n_gpu_layers)
    return plan_model(path, plan_options)


def effective_kwargs(plan: Any, options: EngineOptions) -> dict[str, Any]:
    """The plan's `Llama(**kwargs)` with the user's flags applied on top."""
    kwargs = dict(plan.llama_kwargs)
    if getattr(plan, "use_extra_bufts", None) is not None:
        kwargs.setdefault("use_extra_bufts", bool(plan.use_extra_bufts))  # CPU weight repacking
    if options.n_ctx is not None:
        kwargs["n_ctx"] = options.n_ctx
    if options.n_threads is not None:
        kwargs["n_threads"] = options.n_threads
        kwargs["n_threads_batch"] = options.n_threads
    if options.n_gpu_layers is not None:
        kwargs["n_gpu_layers"] = options.n_gpu_layers
    if options.use_mmap is not None:
        kwargs["use_mmap"] = options.use_mmap
    if options.use_mlock is not None:
        kwargs["use_mlock"] = options.use_mlock
    if options.kv_type and options.kv_type != "f16":
        from corral.app.runtime.native import kv_type_id  # llama_cpp: loaded only when a model is

        kv_type_id(options.kv_type)  # validates the name
        kwargs["type_k"] = kwargs["type_v"] = options.kv_type
        kwargs["flash_attn"] = True  # llama.cpp needs flash attention for a quantized V cache
    kwargs.setdefault("n_ctx", 4096)
    return kwargs


def last_log_line(lines: Sequence[str]) -> str | None:
    """The most telling line of a llama.cpp log excerpt: the last error-ish one, else the last one."""
    keywords = ("error", "failed", "unable", "cannot", "does not", "not supported", "invalid", "out of memory")
    for line in reversed(lines):
        if any(k in line.lower() for k in keywords):
            return line.strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), None)


def does_not_fit_message(plan: Any) -> str:
    advice = getattr(plan, "advice", ()) or ()
    advice_text = advice if isinstance(advice, str) else " ".join(str(a).rstrip(".") + "." for a in advice)
    reason = getattr(plan, "why", "") or getattr(plan, "headline", "") or "the plan says it needs more than RAM + VRAM + disk streaming can give"
    return f"the model will not fit: {reason}. {advice_text} Pass --force to try anyway.".replace("..", ".").replace(".  ", ". ")

