"""One generation at a time: a fair (FIFO) queue in front of the engine, bounded, with cancellation.

Generations run in one worker thread so the event loop stays free for health checks and streaming.
A waiter that goes away (its client disconnected) leaves the queue; a running generation whose
client goes away gets its cancel flag set, and the next one starts only once the engine is
actually free again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Too many requests are already waiting."""


class GenerationQueue:
    """Runs blocking jobs one at a time in a worker thread, at most `max_waiting` waiting behind the running one."""

    def __init__(self, max_waiting: int = 32) -> None:
        self.max_waiting = max_waiting
        self.waiting = 0
        self.running = False
        self.served = 0
        self._lock: asyncio.Lock | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-generate")

    @property
    def full(self) -> bool:
        return self.waiting >= self.max_waiting

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def run(self, job: Callable[[], T], cancel: threading.Event) -> T:
        """Wait for the engine, then run `job` in the worker; cancelling this coroutine sets `cancel`."""
        if self.full:
            raise QueueFull(f"{self.waiting} requests are already waiting")
        lock = self._get_lock()
        self.waiting += 1
        try:
            await lock.acquire()
        finally:
            self.waiting -= 1
        if cancel.is_set():
            lock.release()
            raise asyncio.CancelledError
        self.running = True
        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        deferred = False
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            deferred = True
            future.add_done_callback(self._release_after)
            raise
        finally:
            if not deferred:
                self._release()

    def _release(self) -> None:
        self.running = False
        self.served += 1
        if self._lock is not None:
            self._lock.release()

    def _release_after(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: a cancelled client's failure is nobody's to report
        self._release()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["GenerationQueue", "QueueFull"]
