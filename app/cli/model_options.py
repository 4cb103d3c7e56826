"""The model, plan and sampling flags shared by `corral ask` and `corral chat`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from corral.convert.errors import UsageError

from corral.app.runtime.api import SamplingSettings
from corral.app.runtime.setup import EngineOptions

F = TypeVar("F", bound=Callable[..., Any])

KV_CHOICES = ("f16", "q8_0", "q4_0")
_KEYS = ("model", "ctx", "threads", "ngl", "kv_type", "mmap", "mlock", "force", "verbose", "system", "temperature",
         "top_p", "seed", "max_tokens")


@dataclass(frozen=True)
class ModelArgs:
    """What the shared flags asked for."""

    model: str | None
    engine: EngineOptions
    sampling: SamplingSettings
    system: str | None


def model_options(*, model_required: bool = True, default_max_tokens: int = 1024) -> Callable[[F], F]:
    """Add -m/--model, the plan overrides (--ctx, --threads, --ngl, --kv-type, ...) and the sampling flags."""

    def decorate(f: F) -> F:
        options = [
            click.option("-m", "--model", "model", required=model_required, metavar="MODEL.gguf",
                         help="GGUF model file (first shard of a split), or a name under corral's models folder."),
            click.option("--ctx", type=click.IntRange(min=0), default=None, metavar="N",
                         help="Context window in tokens (default: the plan's; 0 = the model's full length)."),
            click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                         help="CPU threads (default: the plan's)."),
            click.option("--ngl", type=click.IntRange(min=-1), default=None, metavar="N",
                         help="Layers on the GPU(s), overriding the plan (-1 = all)."),
            click.option("--kv-type", type=click.Choice(KV_CHOICES), default="f16", show_default=True,
                         help="KV cache type; q8_0/q4_0 halve/quarter its memory (enables flash attention)."),
            click.option("--mmap/--no-mmap", "mmap", default=None,
                         help="Map the file instead of reading it into RAM (default: the plan's)."),
            click.option("--mlock", is_flag=True, default=False, help="Lock the weights in RAM (no paging out)."),
            click.option("--force", is_flag=True, help="Load even if the plan says the model will not fit."),
            click.option("--verbose", is_flag=True, help="Show llama.cpp's own log on stderr."),
            click.option("--system", default=None, metavar="TEXT", help="System prompt."),
            click.option("--temperature", type=click.FloatRange(min=0.0, max=5.0), default=0.7, show_default=True,
                         help="Sampling temperature; 0 = greedy (deterministic)."),
            click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.95,
                         show_default=True, help="Nucleus sampling threshold."),
            click.option("--seed", type=int, default=None, help="Random seed for sampling (default: random)."),
            click.option("--max-tokens", type=click.IntRange(min=0), default=default_max_tokens, show_default=True,
                         metavar="N", help="Most tokens to generate (0 = until the context is full)."),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def pop_model_args(params: dict[str, Any]) -> ModelArgs:
    """Remove the shared flags from a command's keyword arguments and bundle them."""
    values = {key: params.pop(key, None) for key in _KEYS}
    if values["system"] is not None and not str(values["system"]).strip():
        raise UsageError("--system is empty")
    engine = EngineOptions(
        n_ctx=values["ctx"],
        n_threads=values["threads"],
        n_gpu_layers=values["ngl"],
        kv_type=values["kv_type"] or "f16",
        force=bool(values["force"]),
        verbose=bool(values["verbose"]),
        use_mmap=values["mmap"],
        use_mlock=True if values["mlock"] else None,
    )
    sampling = SamplingSettings(
        temperature=float(values["temperature"] if values["temperature"] is not None else 0.7),
        top_p=float(values["top_p"] if values["top_p"] is not None else 0.95),
        max_tokens=int(values["max_tokens"] if values["max_tokens"] is not None else 1024),
        seed=values["seed"],
    )
    return ModelArgs(model=values["model"], engine=engine, sampling=sampling, system=values["system"])
