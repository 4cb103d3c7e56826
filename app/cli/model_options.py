"""The model, plan and sampling flags shared by `corral ask` and `corral chat`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import click

from corral.app.cli import ui
from corral.app.runtime.api import GenerationStats, SamplingSettings
from corral.app.runtime.setup import EngineOptions
from corral.convert.errors import UsageError
from corral.convert.units import parse_rate
from corral.offload.memory import KV_TYPES
from corral.offload.rpc import check_unique

if TYPE_CHECKING:
    from corral.app.runtime.engine import LlamaEngine

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_SAMPLING = SamplingSettings()
_KEYS = ("model", "ctx", "threads", "ngl", "kv_type", "mmap", "mlock", "force", "verbose", "system", "temperature",
         "top_p", "seed", "max_tokens", "draft", "draft_max", "rpc", "rpc_memory_bandwidth")


@dataclass(frozen=True)
class ModelArgs:
    """What the shared flags asked for."""

    model: str | None
    engine: EngineOptions
    sampling: SamplingSettings
    system: str | None


def model_options(*, model_required: bool = True,
                  default_max_tokens: int = DEFAULT_SAMPLING.max_tokens) -> Callable[[F], F]:
    """Add -m/--model, the plan overrides (--ctx, --threads, --ngl, --kv-type, ...) and the sampling flags."""

    def decorate(f: F) -> F:
        options = [
            click.option("-m", "--model", "model", required=model_required, metavar="MODEL.gguf",
                         help="GGUF model file (first shard of a split), or a name under corral's models folder."),
            click.option("--ctx", type=click.IntRange(min=0), default=None, metavar="N",
                         help="Context window in tokens (default: the plan's; 0 = the model's full length)."),
            *_placement_flags(),
            click.option("--draft", "draft", default=None, metavar="DRAFT.gguf",
                         help="Speculative decoding: a small model with the same tokenizer drafts tokens that the "
                              "model checks in one pass (e.g. Llama 3.2 1B for 3.1 70B/405B); same output, faster "
                              "when the model streams from RAM or disk."),
            click.option("--draft-max", "draft_max", type=click.IntRange(min=1, max=32), default=8, show_default=True,
                         metavar="N", help="Most tokens the draft proposes per step (adapts to its acceptance)."),
            *_run_flags(),
            click.option("--system", default=None, metavar="TEXT", help="System prompt."),
            click.option("--temperature", type=click.FloatRange(min=0.0, max=5.0),
                         default=DEFAULT_SAMPLING.temperature, show_default=True,
                         help="Sampling temperature; 0 = greedy (deterministic)."),
            click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True),
                         default=DEFAULT_SAMPLING.top_p, show_default=True, help="Nucleus sampling threshold."),
            click.option("--seed", type=int, default=None, help="Random seed for sampling (default: random)."),
            click.option("--max-tokens", type=click.IntRange(min=0), default=default_max_tokens, show_default=True,
                         metavar="N", help="Most tokens to generate (0 = until the context is full)."),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _placement_flags() -> list[Callable[[F], F]]:
    """--threads, --ngl, --kv-type, --mmap, --mlock: how a model is placed and run (plan overrides)."""
    return [
        click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                     help="CPU threads (default: the plan's)."),
        click.option("--ngl", type=click.IntRange(min=-1), default=None, metavar="N",
                     help="Layers on the GPU(s), overriding the plan (-1 = all)."),
        click.option("--kv-type", type=click.Choice(list(KV_TYPES)), default=None,
                     help="KV cache type (default: f16); q8_0/q4_0 halve/quarter its memory (a quantized "
                          "type turns flash attention on)."),
        click.option("--mmap/--no-mmap", "mmap", default=None,
                     help="Map the file instead of reading it into RAM (default: the plan's)."),
        click.option("--mlock", is_flag=True, default=False, help="Lock the weights in RAM (no paging out)."),
        click.option("--rpc", "rpc", multiple=True, metavar="HOST:PORT",
                     help="An RPC worker (`corral worker`) whose devices take layers as the plan places them; "
                          "repeat for more. The protocol has no authentication: trusted networks only."),
        click.option("--rpc-memory-bandwidth", "rpc_memory_bandwidth", default=None, metavar="RATE",
                     help="With --rpc: the workers' memory bandwidth for the speed estimate, e.g. 60GB/s "
                          "(default: a worker's CPU reads like this machine's RAM)."),
    ]


def _run_flags() -> list[Callable[[F], F]]:
    return [
        click.option("--force", is_flag=True, help="Load even if the plan says the model will not fit."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's own log on stderr."),
    ]


def load_options() -> Callable[[F], F]:
    """Only the flags that change how a model loads (for commands that read a model but do not chat)."""

    def decorate(f: F) -> F:
        for option in reversed([*_placement_flags(), *_run_flags()]):
            f = option(f)
        return f

    return decorate


def pop_load_options(params: dict[str, Any], *, n_ctx: int | None = None) -> EngineOptions:
    """Remove `load_options`' flags from a command's keyword arguments and make the engine options."""
    values = {key: params.pop(key, None) for key in ("threads", "ngl", "kv_type", "mmap", "mlock", "force", "verbose",
                                                     "rpc", "rpc_memory_bandwidth")}
    return EngineOptions(n_ctx=n_ctx, n_threads=values["threads"], n_gpu_layers=values["ngl"],
                         kv_type=values["kv_type"], force=bool(values["force"]), verbose=bool(values["verbose"]),
                         use_mmap=values["mmap"], use_mlock=True if values["mlock"] else None,
                         **rpc_options(values["rpc"], values["rpc_memory_bandwidth"]))


def rpc_options(endpoints: tuple[str, ...] | None, memory_bandwidth: str | None) -> dict[str, Any]:
    """EngineOptions' RPC fields from --rpc and --rpc-memory-bandwidth (checked here, probed when planning)."""
    if memory_bandwidth and not endpoints:
        raise UsageError("--rpc-memory-bandwidth needs --rpc")
    return {"rpc": check_unique(endpoints or ()),
            "rpc_memory_bandwidth": parse_rate(memory_bandwidth) if memory_bandwidth else None}


def pop_model_args(params: dict[str, Any]) -> ModelArgs:
    """Remove the shared flags from a command's keyword arguments and bundle them."""
    values = {key: params.pop(key, None) for key in _KEYS}
    if values["system"] is not None and not str(values["system"]).strip():
        raise UsageError("--system is empty")
    engine = EngineOptions(
        n_ctx=values["ctx"],
        n_threads=values["threads"],
        n_gpu_layers=values["ngl"],
        kv_type=values["kv_type"],
        force=bool(values["force"]),
        verbose=bool(values["verbose"]),
        use_mmap=values["mmap"],
        use_mlock=True if values["mlock"] else None,
        draft=values["draft"],
        draft_max=int(values["draft_max"] or 8),
        **rpc_options(values["rpc"], values["rpc_memory_bandwidth"]),
    )
    given = {k: values[k] for k in ("temperature", "top_p", "max_tokens", "seed") if values[k] is not None}
    sampling = replace(DEFAULT_SAMPLING, **given)
    return ModelArgs(model=values["model"], engine=engine, sampling=sampling, system=values["system"])


def load_model(args: ModelArgs, cancel: threading.Event | None = None, *,
               eval_callback: Callable[[int, bool, Any], bool] | None = None) -> LlamaEngine:
    """Plan, say the plan's headline, load with a progress bar, then print the engine's warnings."""
    from corral.app.runtime.engine import load_engine, make_plan, resolve_model_path
    from corral.convert.gguf_file import read_gguf

    path = resolve_model_path(args.model or "")
    model_file = read_gguf(path)
    plan = make_plan(path, args.engine, model_file)
    if plan.headline:
        ui.note(("plan:", "dim"), " ", plan.headline)
    with ui.count_progress(f"loading {path.name}") as bar:
        engine = load_engine(path, args.engine, plan=plan, model_file=model_file, cancel=cancel,
                             progress=lambda f: bar(int(f * 100), 100, ""), eval_callback=eval_callback)
    for message in engine.warnings:
        ui.warn(message)
    return engine


def stats_json(stats: GenerationStats) -> dict[str, Any]:
    """A generation's numbers as `--json` prints them."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "prompt_seconds": round(stats.prompt_seconds, 6),
        "generation_seconds": round(stats.generation_seconds, 6),
        "tokens_per_second": round(stats.tokens_per_second, 3),
        "stop_reason": stats.stop_reason,
    }
