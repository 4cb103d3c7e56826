"""`corral plan`: Plan where every tensor goes (GPUs, RAM, disk), what context fits and how fast it runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from corral.app.cli import ui
from corral.convert.units import SIZE_HELP, format_bytes, parse_rate, parse_size
from corral.offload.api import PlanOptions, plan_model
from corral.offload.gpus import parse_gpu_spec
from corral.offload.hardware import Hardware, detect_hardware, load_hardware_file, what_if
from corral.offload.memory import KV_TYPES
from corral.offload.plan import Plan
from corral.offload.rpc import check_unique, with_memory_bandwidth
from corral.offload.speculation import DEFAULT_ACCEPTANCE


def _hardware(model: str, gpu: tuple[str, ...], ram: str | None, disk_read: str | None, cpu_only: bool,
              hardware_file: str | None) -> Hardware:
    specs = [parse_gpu_spec(g) for g in gpu]
    rate = parse_rate(disk_read) if disk_read else None
    ram_bytes = parse_size(ram) if ram else None
    if hardware_file:
        base = load_hardware_file(hardware_file)
    else:
        where = Path(model) if Path(model).exists() else None
        base = detect_hardware(where)
    return what_if(base, gpus=specs or None, ram=ram_bytes, disk_read=rate, cpu_only=cpu_only)


def _with_workers(hw: Hardware, endpoints: tuple[str, ...], memory_bandwidth: str | None) -> Hardware:
    """The hardware with the probed --rpc workers after any a hardware file describes."""
    from corral.app.cli.model_options import rpc_options
    from corral.app.runtime.setup import probe_workers

    given = rpc_options(endpoints, memory_bandwidth)
    workers = probe_workers(given["rpc"], given["rpc_memory_bandwidth"])
    if given["rpc_memory_bandwidth"] and hw.rpc_workers:
        hw = replace(hw, rpc_workers=with_memory_bandwidth(hw.rpc_workers, given["rpc_memory_bandwidth"]))
    if workers:
        check_unique([*(w.endpoint for w in hw.rpc_workers), *(w.endpoint for w in workers)])
        hw = replace(hw, rpc_workers=(*hw.rpc_workers, *workers))
    return hw


@click.command("plan")
@click.argument("model")
@click.option("--quant", "-q", help="Target quant type for an HF folder or catalog name (e.g. Q4_K_M, IQ2_XXS).")
@click.option("--ctx", "n_ctx", type=int, help="Context size (default: the largest that fits).")
@click.option("--kv-type", type=click.Choice(list(KV_TYPES)), default="f16", show_default=True,
              help="KV cache type; q8_0/q4_0 halve/quarter its memory (a quantized type needs flash attention).")
@click.option("--batch", "n_batch", type=int, default=2048, show_default=True, help="Logical batch size.")
@click.option("--ubatch", "n_ubatch", type=int, default=512, show_default=True, help="Physical batch size.")
@click.option("--threads", "n_threads", type=int, help="CPU threads (default: physical cores).")
@click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=int, help="Force this many layers on GPU.")
@click.option("--gpu", multiple=True, help="What-if GPU: 24GiB, 24GiB@1008GB/s or a card (rtx4090, a100-80g, h100); " + SIZE_HELP + ".")
@click.option("--ram", help="What-if RAM size, e.g. 128GiB (" + SIZE_HELP + ").")
@click.option("--disk-read", help="What-if disk read bandwidth, e.g. 3GB/s.")
@click.option("--cpu-only", is_flag=True, help="Plan as if there were no GPU.")
@click.option("--hardware", "hardware_file", type=click.Path(dir_okay=False), help="Hardware description JSON.")
@click.option("--rpc", "rpc", multiple=True, metavar="HOST:PORT",
              help="An RPC worker (`corral worker`): asked for its devices and free memory, its link measured, "
                   "and layers placed on it; repeat for more.")
@click.option("--rpc-memory-bandwidth", "rpc_memory_bandwidth", metavar="RATE",
              help="The workers' memory bandwidth, e.g. 60GB/s (default: a worker's CPU reads like this machine's "
                   "RAM).")
@click.option("--best-quant", is_flag=True, help="Compare every quant type for this model and recommend one.")
@click.option("--draft", default=None, metavar="DRAFT.gguf",
              help="Plan a draft model for speculative decoding too (placed first) and predict the speed-up.")
@click.option("--acceptance", type=click.FloatRange(0.0, 1.0), default=DEFAULT_ACCEPTANCE, show_default=True,
              help="With --draft: the share of drafted tokens the model is assumed to accept.")
@click.option("--json", "json_", is_flag=True, help="Print the plan as JSON.")
def plan(model: str, quant: str | None, n_ctx: int | None, kv_type: str, n_batch: int, n_ubatch: int,
         n_threads: int | None, n_gpu_layers: int | None, gpu: tuple[str, ...], ram: str | None,
         disk_read: str | None, cpu_only: bool, hardware_file: str | None, rpc: tuple[str, ...],
         rpc_memory_bandwidth: str | None, best_quant: bool, draft: str | None, acceptance: float,
         json_: bool) -> None:
    """Plan where every tensor goes (GPUs, RPC workers, RAM, disk), what context fits and how fast it runs."""
    hw = _hardware(model, gpu, ram, disk_read, cpu_only, hardware_file)
    hw = _with_workers(hw, rpc, rpc_memory_bandwidth)
    options = PlanOptions(n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
                          quant=quant, n_gpu_layers=n_gpu_layers, draft=draft, draft_acceptance=acceptance)
    if best_quant:
        _best_quant(model, options, hw, json_)
        return
    result = plan_model(model, options, hw)
    if json_:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    show(result, hw)


def _best_quant(model: str, options: PlanOptions, hw: Hardware, json_: bool) -> None:
    from corral.offload.api import best_quant as run

    rows, pick = run(model, options, hw)
    if json_:
        click.echo(json.dumps({"rows": [r.to_json() for r in rows], "recommended": pick}, indent=2))
        return
    console = Console()
    table = Table(title=Text(f"{rows[0].plan.model}: every quant on this machine" if rows else "no rows"))
    workers = any(r.plan.load.rpc_servers for r in rows)
    measured = any(r.quality for r in rows)
    for col in ("quant", "file", "fits", "GPU", *(("workers",) if workers else ()), "RAM", "disk", "max ctx", "tok/s",
                *(("KLD*",) if measured else ())):
        table.add_column(col, justify="left" if col in ("quant", "fits") else "right")
    for r in rows:
        j = r.to_json()
        mark = "→ " if r.quant == pick else "  "
        fits = "[green]yes[/]" if r.plan.fits and not j["disk_bytes"] else (
            "[yellow]streams[/]" if r.plan.fits else "[red]no[/]")
        table.add_row(Text(mark + r.quant), format_bytes(r.plan.file_bytes), fits, _b(j["gpu_bytes"]),
                      *((_b(j["worker_bytes"]),) if workers else ()), _b(j["ram_bytes"]), _b(j["disk_bytes"]),
                      str(r.plan.n_ctx), _tps(r.plan.tokens_per_second), *((_kld(r.kld),) if measured else ()))
    console.print(table)
    if measured:
        console.print("* mean KL divergence from BF16, measured by corral on a trained miniature Llama "
                      "(bench/bench_quality.py; with or without an importance matrix, whichever lost less): it "
                      "ranks the types; a 405B loses far less")
    if pick:
        why = ("the type that loses least that runs from memory at a usable speed"
               if any(r.quant == pick and not r.plan.disk_stream_bytes for r in rows)
               else "fastest; every option streams from disk")
        console.print(Text.assemble("recommended: ", (pick, "bold"), f" ({why})"))
    else:
        console.print("[red]no quant type fits this machine[/]")


def _kld(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"


def _b(n: int) -> str:
    return format_bytes(n) if n else "-"


def _limit(source: str) -> str:
    return {"machine": "the machine's", "--ram": "--ram"}.get(source, f"limit of {source}")


def _tps(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 0.1 else f"{x:.3f}"


def _rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s >= 1e9 else f"{bytes_per_s / 1e6:.0f} MB/s"


def _offloaded(hw: Hardware) -> str:
    if not hw.rpc_workers:
        return "GPU"
    return "GPUs and workers" if hw.gpus else "workers"


def _network_line(p: Plan, hw: Hardware) -> str:
    """The per-token network cost and the links it comes from."""
    used = {d.endpoint for d in p.devices if d.kind == "rpc" and d.weights_bytes}
    links = "; ".join(f"{w.endpoint} {w.link.round_trip_s * 1e3:.3g} ms, {_rate(w.link.bytes_per_s)}"
                      f"{'' if w.link.measured else ' (assumed)'}" for w in hw.rpc_workers if w.endpoint in used)
    seconds = p.time_per_token["network"]
    share = seconds / sum(p.time_per_token.values())
    return f"network: {seconds * 1e3:.2f} ms per token ({share:.{1 if share >= 0.01 else 2}%} of its time) over {links}"


def show(p: Plan, hw: Hardware) -> None:
    """The human plan: headline, device table, warnings, advice and how to run it."""
    console = Console()
    style = "bold green" if p.fits and not p.disk_stream_bytes else "bold yellow" if p.fits else "bold red"
    console.print(Text(p.headline, style=style))
    table = Table(show_edge=False)
    for col in ("device", "layers", "weights", "KV cache", "compute", "overhead", "total", "capacity", "bandwidth"):
        table.add_column(col, justify="left" if col == "device" else "right")
    for d in p.devices:
        layers = str(d.layers) + (f" +{d.attn_layers} attn" if d.attn_layers else "")
        total = format_bytes(d.total_bytes)
        if not d.fits:
            total = f"[red]{total}[/]"
        table.add_row(Text(f"{d.name} {d.endpoint}" if d.endpoint else d.name), layers if d.kind != "disk" else "",
                      format_bytes(d.weights_bytes), _b(d.kv_bytes), _b(d.compute_bytes), _b(d.overhead_bytes),
                      total, format_bytes(d.capacity_bytes) if d.kind != "disk" else "",
                      f"{d.bandwidth / 1e9:.1f} GB/s")
    for d in p.draft.devices if p.draft else ():
        table.add_row(Text(f"draft {d.name}", style="cyan"), str(d.layers) if d.kind != "disk" else "",
                      format_bytes(d.weights_bytes), _b(d.kv_bytes), _b(d.compute_bytes), _b(d.overhead_bytes),
                      format_bytes(d.total_bytes), "", f"{d.bandwidth / 1e9:.1f} GB/s")
    console.print(table)
    if p.draft is not None and p.speculative is not None:
        s = p.speculative
        gain = (f"k={s.k}: {s.tokens_per_pass:.1f} tokens per pass, ~{_tps(s.tokens_per_second)} tok/s "
                f"({s.speedup:.2f}x)" if s.pays else "drafting does not pay here (it switches itself off)")
        console.print(Text(f"draft {p.draft.model} {p.draft.quant} (~{_tps(p.draft.tokens_per_second)} tok/s alone, "
                           f"context {p.draft.n_ctx}); at {s.acceptance:.0%} acceptance, {gain}", style="cyan"))
    console.print(f"context {p.n_ctx} (model limit {p.n_ctx_train}), KV {p.kv_type}, flash attention "
                  f"{'on' if p.flash_attn else 'off'}, {p.n_gpu_layers}/{p.n_layers} layers on {_offloaded(hw)}, "
                  f"~{_tps(p.tokens_per_second)} tok/s generation, ~{_tps(p.prompt_tokens_per_second)} tok/s prompt")
    if "network" in p.time_per_token:
        console.print(_network_line(p, hw))
    labels = ", ".join(f"{d.name}: {d.label}" for d in p.devices)
    console.print(Text(labels, style="dim"))
    workers = f"; {len(hw.rpc_workers)} RPC worker{'s' if len(hw.rpc_workers) > 1 else ''}" if hw.rpc_workers else ""
    console.print(Text(f"hardware: {hw.source}{workers}; RAM {format_bytes(hw.ram_total)} ({_limit(hw.ram_limit)}); "
                       f"file {format_bytes(p.file_bytes)} ({p.quant})", style="dim"))
    for w in p.warnings:
        ui.warn(w)
    for a in p.advice:
        console.print(Text.assemble(("tip:", "cyan"), " ", a))
    console.print("llama-cli " + " ".join(p.llama_cli_args), soft_wrap=True, markup=False, style="dim")


__all__ = ["plan", "show"]
