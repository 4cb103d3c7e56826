"""`corral imatrix`: Compute an importance matrix for quantizing a model to 2 bits and below."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import click

from corral.app.cli import ui
from corral.app.cli.cmd_ask import interrupt_sets
from corral.app.cli.model_options import (
    DEFAULT_SAMPLING,
    ModelArgs,
    load_model,
    load_options,
    pop_load_options,
)
from corral.app.runtime.texts import CHUNK_TOKENS
from corral.convert.atomic import check_output_path
from corral.convert.errors import Cancelled, InputNotFound, UsageError

BUILTIN_DATASET = "corral:calibration_text"  # what the file records as its text when none is given


def read_calibration(path: Path | None) -> tuple[str, str]:
    """(text, dataset name): the file's text, or the built-in calibration text."""
    if path is None:
        from corral.app.runtime.texts import calibration_text

        return calibration_text(), BUILTIN_DATASET
    if not path.is_file():
        raise InputNotFound(f"text file not found: {path}", path=None)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


@click.command("imatrix")
@click.argument("model", metavar="MODEL.gguf")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path, dir_okay=False),
              metavar="OUT", help="File to write: a GGUF imatrix (as llama-imatrix writes it), or llama.cpp's "
                                  "legacy format when OUT ends in .dat.")
@click.option("-f", "--file", "text_file", type=click.Path(path_type=Path), default=None, metavar="TEXT",
              help="UTF-8 calibration text (default: a built-in English text, Python's documentation).")
@click.option("--ctx", type=click.IntRange(min=8), default=CHUNK_TOKENS, show_default=True, metavar="N",
              help="Tokens per chunk; each chunk starts with BOS and is decoded from an empty cache.")
@click.option("--chunks", type=click.IntRange(min=1), default=None, metavar="N",
              help="Use at most N chunks (default: all the text holds).")
@click.option("--process-output", is_flag=True, help="Collect output.weight's inputs too (the output head).")
@click.option("--json", "json_", is_flag=True, help="Print the result as one JSON object.")
@load_options()
def imatrix(model: str, output: Path, text_file: Path | None, ctx: int, chunks: int | None, process_output: bool,
            json_: bool, **params: Any) -> None:
    """Compute an importance matrix for quantizing a model to 2 bits and below.

    The importance matrix is what llama.cpp's llama-imatrix computes: for every weight matrix, the sum
    over the text's tokens of each input column's squared activation, read through llama.cpp's eval
    callback. `corral quantize --imatrix OUT` (and llama.cpp's quantizer) take the file. MODEL may be
    quantized (Q8_0 is the usual choice for the largest models) and may stream from disk as in `ask`.
    --force also overwrites OUT. Ctrl-C saves the complete chunks so far (exit 130).
    """
    from corral.app.runtime.chunks import text_chunks
    from corral.app.runtime.imatrix_collect import ImatrixCollector, compute_imatrix
    from corral.convert.imatrix_write import is_legacy_path, write_imatrix

    options = pop_load_options(params, n_ctx=ctx)
    check_output_path(output, force=options.force)  # before the model loads, not after the run
    text, dataset = read_calibration(text_file)
    collector = ImatrixCollector(process_output=process_output)
    cancel = threading.Event()
    with interrupt_sets(cancel):
        engine = load_model(ModelArgs(model=model, engine=options, sampling=DEFAULT_SAMPLING, system=None), cancel,
                            eval_callback=collector)
        try:
            cut = text_chunks(engine, text, ctx, chunks)
            ui.note(f"{cut.count} chunks of {ctx} tokens from {dataset}", style="dim")
            with ui.count_progress("imatrix") as bar:
                run = compute_imatrix(engine, collector, cut, dataset=dataset, cancel=cancel,
                                      progress=lambda done, total: bar(done, total, ""))
        finally:
            engine.close()
    data = run.data
    if data.chunk_count == 0:
        raise Cancelled("interrupted before the first chunk was complete; nothing written")
    write_imatrix(output, data, force=options.force)
    result = {
        "output": str(output),
        "format": "dat" if is_legacy_path(output) else "gguf",
        "model": model,
        "entries": len(data.entries),
        "chunks": data.chunk_count,
        "chunks_total": run.chunks_total,
        "chunk_size": data.chunk_size,
        "tokens": data.tokens,
        "datasets": list(data.datasets),
        "process_output": process_output,
        "complete": run.complete,
        "seconds": round(run.seconds, 3),
    }
    if json_:
        click.echo(json.dumps(result, indent=2))
    elif run.complete:
        ui.note(f"wrote {output}: {len(data.entries)} weight matrices, {data.chunk_count} chunks of "
                f"{data.chunk_size} tokens in {run.seconds:.1f} s")
    if not run.complete:
        raise Cancelled(f"interrupted; saved the {data.chunk_count} complete chunks of {run.chunks_total} "
                        f"({data.tokens} tokens) to {output}")
