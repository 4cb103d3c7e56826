"""`corral quantize`: Quantize a GGUF file with llama.cpp's quantizer."""

from __future__ import annotations

import click

from corral.convert.errors import CorralError


@click.command("quantize")
def quantize() -> None:
    """Quantize a GGUF file with llama.cpp's quantizer."""
    raise CorralError("not implemented yet")
