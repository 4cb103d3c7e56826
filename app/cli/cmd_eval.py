"""`corral eval`: Measure a model's perplexity over a text and, with --base, its KL divergence from a base model."""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from corral.app.cli import ui
from corral.app.cli.cmd_ask import interrupt_sets
from corral.app.cli.model_options import load_options, pop_load_options
from corral.app.runtime.setup import EngineOptions
from corral.app.runtime.texts import CHUNK_TOKENS
from corral.convert.errors import Cancelled, InputNotFound, UsageError

if TYPE_CHECKING:
    from corral.app.runtime.engine import LlamaEngine
    from corral.app.runtime.evaluate import EvalResult



def read_text(path: Path | None) -> tuple[str, str]:
    """(text, what it is called): the file's text, or the built-in held-out text."""
    if path is None:
        from corral.app.runtime.texts import eval_text

        return eval_text(), "built-in held-out text"
    if not path.is_file():
        raise InputNotFound(f"text file not found: {path}", path=None)
    try:
        return path.read_text(encoding="utf-8"), path.name
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


@click.command("eval")
@click.argument("model", metavar="MODEL.gguf")
@click.option("--base", "base", default=None, metavar="BASE.gguf",
              help="Compare with this model (the unquantized one): KL divergence, top-1 agreement, Δppl.")
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="UTF-8 text to score (default: a built-in held-out English text, about 11k Llama 3 tokens).")
@click.option("--ctx", type=click.IntRange(min=8), default=CHUNK_TOKENS, show_default=True, metavar="N",
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("--chunks", type=click.IntRange(min=1), default=None, metavar="N",
              help="Score at most N chunks (default: all the text holds).")
@click.option("--json", "json_", is_flag=True, help="Print the numbers as one JSON object.")
@load_options()
def eval_(model: str, base: str | None, text_file: Path | None, ctx: int, chunks: int | None, json_: bool,
          **params: Any) -> None:
    """Measure a model's perplexity over a text and, with --base, its KL divergence from a base model.

    The method is llama.cpp's llama-perplexity: the text is cut into chunks of --ctx tokens, each
    starting with BOS, and the tokens of the second half of every chunk are predicted. With --base,
    the base runs first (its log-probabilities go to a temporary file, 2 bytes per vocabulary entry
    and scored token) and then MODEL runs, so only one model is in memory at a time.
    Ctrl-C stops between batches: what was scored so far is printed (exit 130).
    """
    from corral.app.runtime.evaluate import evaluate

    options = pop_load_options(params, n_ctx=ctx)
    text, text_name = read_text(text_file)
    cancel = threading.Event()

    with ExitStack() as stack:
        bar: list = []

        def load(path: Path, opts: EngineOptions) -> LlamaEngine:
            if bar:  # the scoring bar of the pass before ends here
                stack.close()
                bar.clear()
            return _load(path, opts, cancel)

        def progress(done: int, total: int, what: str = "") -> None:
            if not bar:
                ui.note(f"scoring {what or 'the model'}: {text_name}, {total // (2 if base else 1)} chunks of "
                        f"{ctx} tokens", style="dim")
                bar.append(stack.enter_context(ui.count_progress("scoring")))
            bar[0](done, total, what)

        with interrupt_sets(cancel):
            result = evaluate(model, text, n_ctx=ctx, chunks=chunks, base=base, options=options, load=load,
                              progress=progress, cancel=cancel)
    if json_:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        _print(result)
    if not result.complete:
        raise Cancelled("interrupted; the numbers above cover the chunks scored so far" if result.chunks_scored
                        else "interrupted")


def _load(path: Path, options: EngineOptions, cancel: threading.Event) -> LlamaEngine:
    """Plan, load with a progress bar, print the engine's warnings (but not that --ctx is short: it is chosen)."""
    from corral.app.runtime.engine import load_engine, make_plan
    from corral.convert.gguf_file import read_gguf

    model_file = read_gguf(path)
    plan = make_plan(path, options, model_file)
    if plan.headline:
        ui.note(("plan:", "dim"), " ", plan.headline)
    with ui.count_progress(f"loading {path.name}") as bar:
        engine = load_engine(path, options, plan=plan, model_file=model_file, cancel=cancel,
                             progress=lambda f: bar(int(f * 100), 100, ""))
    for message in engine.warnings:
        if not message.startswith("context is only"):
            ui.warn(message)
    return engine


def _print(result: EvalResult) -> None:
    if result.ppl is not None:
        click.echo(f"perplexity     {result.ppl.value:.4f} ± {result.ppl.stderr:.4f}   "
                   f"({result.tokens_scored} tokens in {result.chunks_scored} chunks of {result.n_ctx})")
    k = result.kld
    if k is not None:
        click.echo(f"base ppl       {k.ppl_base.value:.4f} ± {k.ppl_base.stderr:.4f}")
        click.echo(f"Δppl           {k.delta_ppl.value:+.4f} ± {k.delta_ppl.stderr:.4f}")
        click.echo(f"KLD mean       {k.mean.value:.6f} ± {k.mean.stderr:.6f}")
        click.echo(f"KLD median     {k.median:.6f}   p99 {k.p99:.6f}   max {k.maximum:.6f}")
        click.echo(f"top-1 agreed   {100 * k.top1.value:.2f} ± {100 * k.top1.stderr:.2f} %")
    if result.note:
        ui.note(result.note, style="yellow")
