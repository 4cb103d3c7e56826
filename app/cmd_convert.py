"""`corral convert`: Convert a Hugging Face Llama checkpoint folder to GGUF."""

from __future__ import annotations

import click

from corral.convert.errors import CorralError


@click.command("convert")
def convert() -> None:
    """Convert a Hugging Face Llama checkpoint folder to GGUF."""
    raise CorralError("not implemented yet")
