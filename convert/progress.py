"""Progress reporting for long work without printing from the core.

Core functions take an optional `progress` callback; the CLI and TUI decide how to show it.
"""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, done: int, total: int, what: str = "") -> None:  # pragma: no cover - protocol
        ...


def no_progress(done: int, total: int, what: str = "") -> None:
    """The default callback: ignore progress."""
