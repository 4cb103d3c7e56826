"""`corral download`: Download what conversion needs from a Hugging Face repository."""

from __future__ import annotations

import click

from corral.convert.errors import CorralError


@click.command("download")
def download() -> None:
    """Download what conversion needs from a Hugging Face repository."""
    raise CorralError("not implemented yet")
