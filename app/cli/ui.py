"""Terminal output helpers for the CLI: stderr messages, byte formatting, progress bars."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from corral.convert.progress import ProgressFn

_stderr = Console(stderr=True, highlight=False)


def stderr() -> Console:
    return _stderr


def error(message: str) -> None:
    """One line on stderr, no traceback."""
    first = message.strip().splitlines()[0] if message.strip() else "error"
    _stderr.print(f"[bold red]error:[/] {first}", markup=True, soft_wrap=True)


def warn(message: str) -> None:
    _stderr.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def note(message: str) -> None:
    _stderr.print(message, soft_wrap=True)


@contextmanager
def _progress(description: str, columns: tuple, enabled: bool) -> Iterator[ProgressFn]:
    if not enabled:
        yield lambda done, total, what="": None
        return
    with Progress(*columns, console=_stderr, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, what: str = "") -> None:
            bar.update(task, completed=done, total=total or None, description=f"{description} {what}".rstrip())

        yield update


def byte_progress(description: str, *, enabled: bool = True) -> AbstractContextManager[ProgressFn]:
    """A rich progress bar on stderr with bytes, speed and ETA; yields a ProgressFn."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    return _progress(description, columns, enabled)


def count_progress(description: str, *, enabled: bool = True) -> AbstractContextManager[ProgressFn]:
    """A rich progress bar on stderr counting items (tensors, tokens); yields a ProgressFn."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    )
    return _progress(description, columns, enabled)
