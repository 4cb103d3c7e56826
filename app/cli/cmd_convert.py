"""`corral convert`: Convert a Hugging Face Llama checkpoint folder to GGUF."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from corral.app.cli import ui
from corral.convert.errors import UsageError
from corral.convert.progress import ProgressFn
from corral.convert.units import SIZE_HELP, format_bytes


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="GGUF file to write.")
@click.option(
    "--outtype",
    type=click.Choice(["auto", "bf16", "f16", "f32", "q8_0"], case_sensitive=False),
    default="auto",
    show_default=True,
    help="Tensor type (auto: the checkpoint's own 16-bit type). Norms and rope_freqs stay F32.",
)
@click.option("--quant", "quant", metavar="TYPE", help="Quantize while converting (e.g. Q4_K_M, IQ2_XXS): no BF16 GGUF on disk.")
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix for --quant (.dat or .gguf).")
@click.option("--split-max-size", metavar="SIZE", help="Split into shards of at most SIZE (e.g. 50GB; " + SIZE_HELP + ").")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--json", "json_", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert(src: Path, out: Path, outtype: str, quant: str | None, imatrix: Path | None,
            split_max_size: str | None, force: bool, json_: bool, quiet: bool) -> None:
    """Convert a Hugging Face Llama checkpoint folder to GGUF.

    SRC is a folder with config.json, tokenizer files and safetensors weights (BF16, F16, F32
    or Meta's FP8). The output matches llama.cpp's own converter byte for byte (q8_0 included),
    streams tensor by tensor with bounded memory, and appears atomically.
    """
    from corral.convert.units import parse_size

    split = parse_size(split_max_size) if split_max_size else None
    if imatrix is not None and quant is None:
        raise UsageError("--imatrix only applies with --quant")
    if quant is not None:
        if split is not None:
            raise UsageError("--split-max-size is not supported together with --quant")
        from corral.convert.stream_quantize import convert_quantized

        with ExitStack() as stack:
            progress = _lazy_bar(stack, lambda: ui.count_progress(f"converting to {quant.upper()}"), not quiet and not json_)
            qres = convert_quantized(src, out, ftype=quant, imatrix=imatrix, force=force, progress=progress)
        size = int(getattr(qres, "bytes_written", 0))
        payload = {"paths": [str(out)], "bytes": size, "type": quant.upper()}
        _report(payload, json_, f"wrote {out} ({format_bytes(size)}, {quant.upper()})")
        return
    from corral.convert.converter import convert_checkpoint

    with ExitStack() as stack:
        progress = _lazy_bar(stack, lambda: ui.byte_progress("converting"), not quiet and not json_)
        result = convert_checkpoint(src, out, outtype=outtype.lower(), split_max_size=split, force=force, progress=progress)
    payload = {
        "paths": [str(p) for p in result.paths],
        "bytes": result.bytes_written,
        "n_tensors": result.n_tensors,
        "outtype": result.outtype,
        "seconds": round(result.seconds, 3),
    }
    where = result.paths[0] if len(result.paths) == 1 else f"{len(result.paths)} shards, first {result.paths[0]}"
    _report(payload, json_, f"wrote {where} ({format_bytes(result.bytes_written)}, {result.n_tensors} tensors, "
                            f"{result.outtype}, {result.seconds:.1f} s)")


def _lazy_bar(stack: ExitStack, make: Callable[[], Any], enabled: bool) -> ProgressFn:
    """A progress callback whose bar appears on the first update (after the input checks passed)."""
    bar: list[ProgressFn] = []

    def update(done: int, total: int, what: str = "") -> None:
        if not enabled:
            return
        if not bar:
            bar.append(stack.enter_context(make()))
        bar[0](done, total)

    return update


def _report(payload: dict[str, object], json_: bool, line: str) -> None:
    if json_:
        click.echo(json.dumps(payload))
    else:
        ui.note(line)
