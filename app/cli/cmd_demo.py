"""`corral demo`: the whole pipeline on a miniature Llama 3.1, offline, in about a minute."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from corral.app import locations
from corral.app.cli import ui
from corral.app.runtime.api import Message, SamplingSettings
from corral.convert.units import format_bytes

DEMO_PROMPT = "In one sentence, what is a llama?"
REAL_MODEL = "llama-3.1-405b-instruct"
REAL_QUANT = "IQ2_XXS"


def _step(n: int, total: int, title: str) -> None:
    ui.note("\n", (f"{n}/{total}", "bold cyan"), " ", (title, "bold"))


@click.command("demo")
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where to build the demo files (default: corral's cache folder).",
)
@click.option("--prompt", default=DEMO_PROMPT, show_default=True, help="The question the miniature model answers.")
@click.option("--quant", default="Q4_K_M", show_default=True, help="Quantization type for step 3.")
@click.option("--fresh", is_flag=True, help="Rebuild everything even if an earlier demo left files.")
def demo(workdir: Path | None, prompt: str, quant: str, fresh: bool) -> None:
    """Build a miniature Llama 3.1 model, convert, quantize, plan and ask it, offline.

    The miniature model has the real Llama 3 tokenizer and architecture but random
    weights: its answer is noise. The same steps run the real 405B (see the README).
    """
    from corral.app.runtime.engine import EngineOptions, load_engine
    from corral.convert.converter import convert_checkpoint
    from corral.convert.gguf_summary import summarize
    from corral.convert.minimodel import MiniSpec, build_checkpoint
    from corral.convert.quantize import quantize_gguf
    from corral.offload.api import PlanOptions, plan_model

    spec = MiniSpec(n_embd=256, n_layer=4, n_head=8, n_head_kv=2, n_ff=768, shards=2)
    root = workdir or locations.cache_dir() / "demo"
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "Llama-3.1-Mini-Instruct"
    bf16 = root / "llama-3.1-mini-bf16.gguf"
    quantized = root / f"llama-3.1-mini-{quant.lower()}.gguf"
    total = 6
    started = time.perf_counter()

    _step(1, total, "Build a miniature Llama 3.1 checkpoint (Hugging Face layout, random weights)")
    if not (ckpt / "config.json").exists():
        with ui.stderr().status("writing config, tokenizer and sharded safetensors..."):
            build_checkpoint(ckpt, spec, seed=0)
    ui.note(
        f"  {ckpt}: {spec.n_layer} layers, hidden {spec.n_embd}, {spec.n_head} heads / "
        f"{spec.n_head_kv} KV heads, real 128,256-token Llama 3 tokenizer"
    )

    _step(2, total, "Convert it to GGUF (BF16)")
    if not bf16.exists():
        with ui.byte_progress("  convert") as progress:
            result = convert_checkpoint(ckpt, bf16, outtype="bf16", progress=progress)
        ui.note(f"  wrote {bf16.name}: {format_bytes(result.bytes_written)} in {result.seconds:.1f} s")
    else:
        ui.note(f"  {bf16.name} already there")

    _step(3, total, f"Quantize it to {quant} with llama.cpp's quantizer")
    if not quantized.exists():
        with ui.count_progress("  quantize") as progress:
            qres = quantize_gguf(bf16, quantized, ftype=quant, progress=progress)
        ui.note(
            f"  {format_bytes(qres.input_bytes)} -> {format_bytes(qres.output_bytes)} "
            f"({qres.bpw:.2f} bits/weight) in {qres.seconds:.1f} s"
        )
    else:
        ui.note(f"  {quantized.name} already there")
    summary = summarize(quantized)
    types = ", ".join(f"{k} x{v}" for k, v in summary.tensor_types.items())
    ui.note(f"  {summary.parameters / 1e6:.1f} M parameters; tensor types: {types}")

    _step(4, total, "Plan the miniature model on this machine")
    mini_plan = plan_model(quantized, PlanOptions(n_ctx=2048))
    ui.note(f"  {mini_plan.headline}")

    _step(5, total, f"Plan the real Llama 3.1 405B Instruct ({REAL_QUANT}) on this machine")
    big_plan = plan_model(REAL_MODEL, PlanOptions(quant=REAL_QUANT))
    ui.note(f"  {big_plan.headline}")
    for line in list(big_plan.warnings)[:3]:
        ui.warn(line)
    for line in list(big_plan.advice)[:3]:
        ui.note(f"  - {line}")

    _step(6, total, "Ask the miniature model one question")
    ui.note(f"  > {prompt}")
    with ui.count_progress("  load") as bar:
        engine = load_engine(quantized, EngineOptions(n_ctx=2048), plan=mini_plan,
                             progress=lambda f: bar(int(f * 100), 100, ""))
    with engine:
        gen = engine.generate([Message("user", prompt)], SamplingSettings(temperature=0.0, max_tokens=48, seed=0),
                              on_text=lambda text: click.echo(text, nl=False))
        click.echo()
    stats = gen.stats
    ui.note(
        f"  {stats.completion_tokens} tokens at {stats.tokens_per_second:.0f} tok/s "
        f"(prompt {stats.prompt_tokens} tokens at {stats.prompt_tokens_per_second:.0f} tok/s)"
    )
    ui.note(
        "\n", ("That reply is noise:", "bold"), " the miniature model has random weights. Everything else was real - "
        "the tokenizer, the GGUF conversion, llama.cpp's quantizer, the offload plan and llama.cpp's inference.\n"
        "To run the real Llama 3.1 405B: corral download -> convert -> quantize -> plan -> chat "
        "(README: 'Run the real 405B').\n"
        f"Demo files are in {root} (done in {time.perf_counter() - started:.0f} s)."
    )
