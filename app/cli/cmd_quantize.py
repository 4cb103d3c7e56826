"""`corral quantize`: Quantize a GGUF file with llama.cpp's quantizer."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import click

from corral.app.cli import ui
from corral.convert import quant_types
from corral.convert.errors import UsageError
from corral.convert.units import format_bytes


class _QuantizeCommand(click.Command):
    """Adds the table of quantization types (computed on demand) to --help."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, f"{bpw:5.2f}", f"{eff:5.2f}", note) for name, bpw, eff, note in quant_types.quality_table()]
        with formatter.section("Types (bits/weight: nominal, whole file on Llama 3.1 8B)"):
            formatter.write_dl([(r[0], f"{r[1]} {r[2]}  {r[3]}") for r in rows], col_max=12)
        formatter.write_paragraph()
        formatter.write_text("Q4_K/Q5_K/Q3_K mean the _M mixes. Importance matrices: GGUF or legacy .dat "
                             "imatrix files, from `corral imatrix` or llama.cpp's llama-imatrix.")


@click.command("quantize", cls=_QuantizeCommand)
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path), required=False)
@click.option("--type", "-t", "qtype", required=True, metavar="TYPE",
              help="llama.cpp file type: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, IQ4_XS, IQ2_XXS, IQ1_M, ...")
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix (.dat or .gguf).")
@click.option("--dry-run", is_flag=True, help="Show per-tensor types and the exact output size; write nothing.")
@click.option("--json", "json_", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Worker threads (0: all cores).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--keep-split", is_flag=True, help="Write as many shards as a split input has.")
@click.option("--allow-requantize", is_flag=True, help="Allow an already-quantized input (loses quality).")
def quantize(src: Path, out: Path | None, qtype: str, imatrix: Path | None, dry_run: bool, json_: bool,
             threads: int, force: bool, keep_split: bool, allow_requantize: bool) -> None:
    """Quantize a GGUF file with llama.cpp's quantizer.

    SRC is a BF16/F16/F32 GGUF (or the first shard of a split one); OUT is the file to write.
    Types at 2 bits and below (IQ1_*, IQ2_*, IQ3_XXS/XS, Q2_K_S) need --imatrix.
    """
    from corral.convert.quantize import quantize_gguf

    info = quant_types.file_type(qtype)
    if out is None and not dry_run:
        raise UsageError("missing OUT (the quantized file to write); only --dry-run can go without it")
    target = out or src.with_name(f"{src.stem}-{info.name}.gguf")
    with ExitStack() as stack:
        bar: list = []

        def progress(done: int, total: int, what: str = "") -> None:
            if not bar:  # the bar appears once llama.cpp starts, not before the checks
                bar.append(stack.enter_context(ui.count_progress(f"quantizing to {info.name}")))
            bar[0](done, total, what)

        result = quantize_gguf(src, target, ftype=info.name, imatrix=imatrix, threads=threads, force=force,
                               dry_run=dry_run, keep_split=keep_split, allow_requantize=allow_requantize,
                               progress=progress)
    if result.requantized:
        ui.warn("the input was already quantized: requantizing compounds the error; quantize from BF16 when you can")
    if json_:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    if dry_run:
        counts = Counter(t.type_out for t in result.tensors)
        for t in result.tensors:
            click.echo(f"{t.name:<36} {t.type_in:>7} -> {t.type_out:<7} {format_bytes(t.bytes_out):>10}")
        click.echo(f"types: {', '.join(f'{k} x{v}' for k, v in counts.most_common())}")
        click.echo(f"output size: {result.output_bytes:,} bytes ({format_bytes(result.output_bytes)}, "
                   f"{result.bpw:.2f} bits/weight) from {format_bytes(result.input_bytes)}")
        if info.needs_imatrix and imatrix is None:
            ui.note(f"note: {info.name} needs --imatrix to actually run")
        return
    ui.note(f"wrote {', '.join(result.output)}: {format_bytes(result.output_bytes)} "
            f"({result.bpw:.2f} bits/weight) in {result.seconds:.1f} s")
