"""`corral plan`: Plan where every tensor goes (GPUs, RAM, disk), what context fits and how fast it runs."""

from __future__ import annotations

import click

from corral.convert.errors import CorralError


@click.command("plan")
def plan() -> None:
    """Plan where every tensor goes (GPUs, RAM, disk), what context fits and how fast it runs."""
    raise CorralError("not implemented yet")
