"""Terminal output helpers for the CLI: stderr messages, byte formatting, progress bars.

Every string handed to these helpers is printed literally: file names, model names, paths, prompts and
error messages are data, never Rich markup. Our own styling travels as `(text, style)` parts.
"""

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
from rich.text import Text

from corral.convert.progress import ProgressFn

_stderr = Console(stderr=True, highlight=False, markup=False, emoji=False)  # raw strings printed here are data too

Part = str | tuple[str, str] | Text
"""A piece of a line: plain text (printed as is), `(text, style)`, or a ready `rich.text.Text`."""


def stderr() -> Console:
    return _stderr


def plain(*parts: Part, style: str = "") -> Text:
    """One styled line from literal parts (no markup is parsed in any of them)."""
    return Text.assemble(*parts, style=style)


def error(message: str) -> None:
    """One line on stderr, no traceback."""
    first = message.strip().splitlines()[0] if message.strip() else "error"
    _stderr.print(plain(("error:", "bold red"), " ", first), soft_wrap=True)


def warn(message: str) -> None:
    _stderr.print(plain(("warning:", "yellow"), " ", message), soft_wrap=True)


def note(*parts: Part, style: str = "") -> None:
    """A line on stderr: `note("wrote ", path)`, `note(("plan:", "dim"), " ", headline)`, `note(text, style="dim")`."""
    _stderr.print(plain(*parts, style=style), soft_wrap=True)


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
        TextColumn("{task.description}", markup=False),
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
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    )
    return _progress(description, columns, enabled)
