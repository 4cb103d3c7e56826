"""`corral info`: show what a GGUF file holds, read from its header."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from corral.convert.units import format_bytes


@click.command("info")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--json", "json_", is_flag=True, help="Print the summary as JSON.")
@click.option("--hardware", is_flag=True,
              help="Show this machine instead: CPU, RAM, GPUs and whether llama.cpp's CPU extra buffers work.")
@click.option("--reprobe", is_flag=True, help="With --hardware: test the CPU extra buffers again.")
def info(model: Path | None, json_: bool, hardware: bool, reprobe: bool) -> None:
    """Show what a GGUF file holds, read from its header (no weights loaded)."""
    from corral.convert.gguf_summary import summarize

    if hardware or reprobe:
        from corral.app.cli.info_hardware import show_hardware

        show_hardware(json_=json_, reprobe=reprobe)
        return
    if model is None:
        raise click.UsageError("give a MODEL file, or --hardware")

    summary = summarize(model)
    if json_:
        click.echo(json.dumps(summary.to_json(), indent=2))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("name", summary.name or "-"),
        ("architecture", summary.architecture),
        ("parameters", f"{summary.parameters / 1e9:.3f} B ({summary.parameters:,})"),
        ("file type", summary.file_type or "-"),
        ("size", f"{format_bytes(summary.file_bytes)} ({summary.bits_per_weight:.2f} bits/weight)"),
        ("files", f"{summary.split_count} ({', '.join(Path(f).name for f in summary.files)})"),
        ("context length", str(summary.context_length or "-")),
        (
            "layers / heads / kv heads",
            f"{summary.block_count} / {summary.head_count} / {summary.head_count_kv}",
        ),
        ("embedding / FFN", f"{summary.embedding_length} / {summary.feed_forward_length}"),
        ("vocabulary", f"{summary.vocab_size} ({summary.tokenizer_model}, {summary.tokenizer_pre})"),
        ("chat template", "yes" if summary.has_chat_template else "no"),
        ("tensors", f"{summary.tensor_count}: " + ", ".join(f"{k} {v}" for k, v in summary.tensor_types.items())),
    ]
    for key, value in rows:
        table.add_row(key, Text(value))
    Console().print(table)
