"""`corral download`: Download what conversion needs from a Hugging Face repository."""

from __future__ import annotations

import json
from pathlib import Path

import click

from corral.app.cli import ui
from corral.app.locations import data_dir
from corral.convert.units import format_bytes


@click.command("download")
@click.argument("repo_id")
@click.option("--dir", "dest", type=click.Path(path_type=Path),
              help="Folder to download into (default: <data dir>/hf/<owner>--<name>).")
@click.option("--include-original", is_flag=True, help="Also fetch the original/ folder (Meta's .pth weights).")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token for gated models (default: HF_TOKEN or `hf auth login`).")
@click.option("--revision", help="Branch, tag or commit.")
@click.option("--json", "json_", is_flag=True, help="Print the result as JSON on stdout.")
def download(repo_id: str, dest: Path | None, include_original: bool, token: str | None, revision: str | None,
             json_: bool) -> None:
    """Download what conversion needs from a Hugging Face repository.

    Fetches config, tokenizer, chat template and safetensors weights (skipping original/ unless
    --include-original), after checking that the disk has room. Interrupted downloads resume.
    Example: corral download meta-llama/Llama-3.1-8B-Instruct --dir ./llama-8b
    """
    from corral.convert.download import download_repo

    folder = dest or data_dir() / "hf" / repo_id.replace("/", "--")
    if not json_:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # one overall bar (bytes, speed, ETA) instead of one per file
    with ui.byte_progress(f"downloading {repo_id}", enabled=not json_) as progress:
        result = download_repo(repo_id, folder, include_original=include_original, token=token or None,
                               revision=revision, progress=progress)
    if json_:
        click.echo(json.dumps({"folder": str(result.folder), "files": list(result.files),
                               "bytes_total": result.bytes_total, "bytes_fetched": result.bytes_fetched}))
    else:
        ui.note(f"{repo_id}: {len(result.files)} files, {format_bytes(result.bytes_total)} in {result.folder}")
        ui.note(f"next: corral convert {result.folder} -o model.gguf")
