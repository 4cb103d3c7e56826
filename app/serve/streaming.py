"""Text on its way out of a generation: cut at stop strings, and tool calls held back until they are whole."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from corral.app.runtime.tools import looks_like_call


class StopScanner:
    """Cuts streamed text at the first stop string; holds back a tail that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._buffer = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        """The part of the text so far that is certainly not (part of) a stop string."""
        if self.hit:
            return ""
        if not self.stops:
            return piece
        self._buffer += piece
        found = [i for i in (self._buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            out, self._buffer = self._buffer[:min(found)], ""
            return out
        keep = 0
        for k in range(min(len(self._buffer), self._longest - 1), 0, -1):
            tail = self._buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        out = self._buffer[:len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return out

    def finish(self) -> str:
        """What is still held back once the generation has ended (nothing after a stop string)."""
        out, self._buffer = ("" if self.hit else self._buffer), ""
        return out


class ToolGate:
    """With tools offered, holds back text while it may still be a tool call; passes it on once it cannot be."""

    def __init__(self, active: bool) -> None:
        self.holding = active
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.holding:
            return text
        self.held += text
        if looks_like_call(self.held):
            return ""
        self.holding = False
        out, self.held = self.held, ""
        return out


class GenerationJob:
    """The worker-thread side of one request: its cancel flag, stop strings and the text sent so far."""

    def __init__(self, stops: Sequence[str], sink: Callable[[str], None] | None = None) -> None:
        self.cancel = threading.Event()
        self.scanner = StopScanner(stops)
        self.parts: list[str] = []
        self._sink = sink

    def on_text(self, piece: str) -> None:
        out = self.scanner.feed(piece)
        self._emit(out)
        if self.scanner.hit:
            self.cancel.set()  # the engine stops before the next token

    def finish(self) -> None:
        self._emit(self.scanner.finish())

    def _emit(self, text: str) -> None:
        if text:
            self.parts.append(text)
            if self._sink is not None:
                self._sink(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def stopped_by_string(self) -> bool:
        return self.scanner.hit


__all__ = ["GenerationJob", "StopScanner", "ToolGate"]
