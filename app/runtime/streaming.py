"""Weights larger than memory: a fixed resident set stays in the page cache, the rest streams ahead of compute.

Under plain mmap the kernel's LRU sees one sweep over the whole file per token, evicts pages that are needed
again soon and reads more than the missing part. Here the plan's resident share is locked (`mlock` through our
own read-only mapping of the file: the same page-cache pages llama.cpp maps), or, where the lock is refused,
kept hot with `WILLNEED` once per token. The streamed layers are read ahead in the order the graph consumes
them, step by step (attention, FFN gate, up, down: `offload.memory.STREAM_STEPS`), by a prefetch thread that
llama.cpp's eval callback keeps informed (it asks for the node that starts each layer, `attn_norm-<i>`, the nodes
that start the steps of streamed layers, and `result_norm` for the output head); each step is dropped from the
page cache once computed, and the layer out to the huge-page folios at its edges once left behind, so streaming
never pushes the resident set out and the read-ahead room need only hold a step. Streamed layers
are advised MADV_HUGEPAGE and MADV_RANDOM in llama.cpp's mapping, so every read there (the prefetch thread's
populates and compute's own faults) asks the disk for the 2 MiB folio around it and nothing past the layer's end.
Inside a memory cgroup the sets follow the group: measured after loading, again when a batch wrote more of the
compute buffer, a draft gave memory back, or every few seconds.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.app.runtime.page_cache import (
    EDGES,
    HUGEPAGE,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_POPULATE_READ,
    MADV_RANDOM,
    MAP_SHARED,
    POPULATE,
    PROT_READ,
    RANDOM,
)
from corral.app.runtime.page_cache import libc as _libc
from corral.app.runtime.page_cache import malloc_trim as _malloc_trim
from corral.app.runtime.page_cache import read_bytes as _read_bytes
from corral.app.runtime.stream_units import (
    PMD,
    STEPS,
    Mapping,
    Piece,
    Span,
    StreamSets,
    Unit,
    choose,
    drop_range,
    llama_mappings,
    markers,
    pieces_of,
    rebalance,
    round_in,
    round_out,
    shared_folios,
    units_of,
    window_for,
)

WILLNEED_CHUNK = 8 * 1024 * 1024  # readahead issued in pieces so the window is honoured closely
CALIBRATION_MIN_READ = 16 * 1024 * 1024  # a token that read less says little about the disk
CALIBRATION_MIN_TOKENS = 3
# the group is measured again this often: its anonymous memory may grow (the heap, a long chat), and locked
# resident weights cannot give way to it
REMEASURE_S = 2.0


@dataclass(frozen=True)
class StreamStats:
    """The streamed tier as measured over the last token."""

    read_per_token: int
    read_speed: float  # bytes/s over the last token
    resident_locked: bool
    resident_bytes: int
    streamed_bytes: int


_active: list[Streamer] = []  # the streamers of loaded engines, for live views (the chat's memory view)


def live_stats() -> StreamStats | None:
    """The measured streamed tier of the most recently started streamer (None: nothing streams)."""
    return _active[-1].stats if _active else None


class Streamer:
    """Owns the resident lock, the prefetch thread and the eval callback for one loaded model."""

    def __init__(self, units: Sequence[Unit], stream_bytes: int, n_layer: int, *, lock: bool = True,
                 reserve: int = 0, touched: Callable[[int], int] | None = None, rows: Sequence[Span] = (),
                 steps: dict[tuple[int, int], tuple[Span, ...]] | None = None) -> None:
        """`reserve`: memory the process will still write after loading (the compute buffer generation touches);
        `touched(n)`: what a batch of n tokens writes of it, so a refresh counts only what no batch wrote yet;
        `rows`: what a token reads a row of (the token embedding); `steps`: the layers' bytes by step
        (`stream_units.step_spans`), read ahead and dropped step by step (None: layer by layer)."""
        from llama_cpp import llama_cpp as lc

        self.units, self.n_layer, self._want_lock, self.reserve = tuple(units), n_layer, lock, reserve
        self._touched, self.largest_batch, self._rows = touched, 0, tuple(rows)
        self._sized_batch = 0  # the largest batch when the sets were last sized (a bigger one wrote more memory)
        self._sized_at = time.monotonic()
        self._steps = steps or {}
        self._npos = n_layer * len(STEPS) + 1  # graph positions: layer * len(STEPS) + step, then the head
        self._choose(stream_bytes)
        from corral.convert.ggml_lib import ggml

        self._get_name, self._nrows = ggml().ggml_get_name, ggml().ggml_nrows
        self.callback = lc.ggml_backend_sched_eval_callback(self._on_eval)
        self._cond = threading.Condition()
        self._pos: int | None = None
        self.positions = 0  # layer boundaries the eval callback reported
        self._stop = False
        self._fetched: dict[int, int] = {}  # streamed piece (its position) -> bytes read ahead so far
        self._fds: dict[Path, int] = {}
        self._own: dict[Path, tuple[int, int]] = {}  # our mapping of each file (address, length)
        self._refresh = False
        self._speeds: list[float] = []  # per-token read speeds, for the plan's disk tier (see close)
        self._waited = 0.0  # seconds the prefetch thread had nothing to read (its room full, or all read)
        self._llama: dict[Path, Mapping] = {}
        self.locked = False
        self._thread: threading.Thread | None = None
        self._last: tuple[float, int, float] | None = None
        self.stats = StreamStats(0, 0.0, False, self.sets.resident_bytes, self.sets.streamed_bytes)

    def _choose(self, stream_bytes: int) -> None:
        self._use(choose(self.units, stream_bytes, window_for(self.units, stream_bytes, self._steps)))

    def _use(self, sets: StreamSets) -> None:
        self.sets = sets
        self._order = sorted(u.index for u in sets.streamed)
        self._by_index = {u.index: u for u in sets.streamed}
        self._pieces = {p.pos: p for u in sets.streamed for p in pieces_of(u, self._steps)}
        self._markers = markers(self._pieces.values(), self.n_layer)
        self._shared = shared_folios([*sets.resident, *sets.streamed]) if EDGES else {}

    def describe(self) -> dict[str, Any]:
        return {"resident_bytes": self.sets.resident_bytes, "streamed_bytes": self.sets.streamed_bytes,
                "window": self.sets.window, "locked": self.locked, "streamed_units": self._order}

    # -- setup ---------------------------------------------------------------------------------
    def start(self) -> None:
        """After llama.cpp mapped the model: lock the resident set, find llama.cpp's mappings, start."""
        measured = measured_stream_bytes(self.units, self.reserve)
        if measured is not None:
            self._choose(measured)
        files = {s.file for u in self.units for s in u.spans}
        for f in files:
            self._fds[f] = os.open(f, os.O_RDONLY)
        self._llama = llama_mappings(sorted(files))
        self.locked = self._lock_resident() if self._want_lock else False
        if not self.locked:
            self._keep_hot()
        if RANDOM:  # a fault there would read the file's read-around (8 MiB) for a row
            self._advise(self._rows, MADV_RANDOM)
        for u in self.sets.streamed:  # what llama.cpp's load left in the cache is not ours to keep
            self._evict(u)
            self._advise_streamed(u)
        self._thread = threading.Thread(target=self._run, name="corral-prefetch", daemon=True)
        self._thread.start()
        _active.append(self)

    def _advise_streamed(self, unit: Unit) -> None:
        if HUGEPAGE:
            self._advise(unit.spans, MADV_HUGEPAGE)  # faults and populates read 2-4 MiB at a time (see HUGEPAGE)
        if RANDOM:
            self._advise(unit.spans, MADV_RANDOM)  # and nothing past the unit's end (see RANDOM)

    def _lock_resident(self) -> bool:
        for f, fd in self._fds.items():
            size = os.fstat(fd).st_size
            addr = _libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return False
            self._own[f] = (addr, size)
            for u in self.sets.resident:
                for s in u.spans:
                    if s.file != f:
                        continue
                    lo, hi = round_out(s.start, s.end)
                    if _libc.mlock(addr + lo, hi - lo) != 0:
                        self._unmap()  # unlocks what was locked
                        return False
        return True

    def _unmap(self) -> None:
        for addr, size in self._own.values():
            _libc.munmap(addr, size)
        self._own.clear()

    def _keep_hot(self) -> None:
        for u in self.sets.resident:
            for s in u.spans:
                os.posix_fadvise(self._fds[s.file], s.start, s.end - s.start, os.POSIX_FADV_WILLNEED)

    # -- the graph's position ------------------------------------------------------------------
    def _on_eval(self, tensor: int, ask: bool, _user: Any) -> bool:
        try:  # nothing may escape into C: False on the second call would stop the graph
            pos = self._markers.get(self._get_name(tensor) or b"")
            if ask:
                return pos is not None
            if pos is not None:
                self.positions += 1
                if pos == 0:  # attn_norm-0 is [n_embd, tokens in this ubatch]
                    self.largest_batch = max(self.largest_batch, int(self._nrows(tensor)))
                with self._cond:
                    self._pos = pos
                    self._cond.notify()
        except BaseException:  # noqa: BLE001
            return not ask
        return True

    def _run(self) -> None:
        seen: int | None = None
        while True:
            with self._cond:
                t0 = time.perf_counter()
                while not self._stop and self._pos == seen:
                    self._cond.wait()
                self._waited += time.perf_counter() - t0
                if self._stop:
                    return
                before, seen = seen, self._pos
            assert seen is not None
            if before is not None and seen < before:  # the graph started over: a new token
                self._token_boundary()
            self._follow(seen)

    def refresh(self) -> None:
        """Memory was given back (a draft closed): at the next token, re-size the resident set to what the group
        leaves now. Applied by the prefetch thread, which owns the sets while it runs."""
        if _malloc_trim is not None:  # glibc keeps freed heap pages: hand them back so the group's measurement sees them
            _malloc_trim(0)
        self._refresh = True

    def reserve_left(self) -> int:
        """What of the reserve no batch has written yet (the group's anonymous memory holds the rest)."""
        if self._touched is None or not self.largest_batch:
            return self.reserve
        return max(0, self.reserve - self._touched(self.largest_batch))

    def _apply_refresh(self) -> None:
        """Re-size the resident set to what the group leaves now: units (spread over the token, as `choose`
        spreads them) join it when there is more room, and leave it (unlocked, dropped, streamed) when a batch
        wrote more of the compute buffer than the streamer held back for it."""
        self._refresh = False
        self._sized_batch, self._sized_at = self.largest_batch, time.monotonic()
        measured = measured_stream_bytes(self.units, self.reserve_left())
        if measured is None:
            return
        new, grown, shrunk = rebalance(self.sets, measured, window_for(self.units, measured, self._steps))
        self._use(new)
        moved = {u.index for u in (*grown, *shrunk)}  # read again from their start: cached pages cost nothing
        self._fetched = {k: v for k, v in self._fetched.items() if k // len(STEPS) not in moved}
        for u in grown:  # unlocked, they are kept hot at each token boundary like the rest of the resident set
            for sp in u.spans if self.locked else ():
                lo, hi = round_out(sp.start, sp.end)
                _libc.mlock(self._own[sp.file][0] + lo, hi - lo)  # refused: it stays hot as long as it is used
        for u in shrunk:
            for sp in u.spans if self.locked else ():
                lo, hi = round_in(sp.start, sp.end)  # whole pages: a neighbour's stay locked
                if hi > lo:
                    _libc.munlock(self._own[sp.file][0] + lo, hi - lo)
            self._advise_streamed(u)
            self._evict(u)

    def _token_boundary(self) -> None:
        if (self._refresh or self.largest_batch != self._sized_batch
                or time.monotonic() - self._sized_at > REMEASURE_S):
            self._apply_refresh()
        now = (time.perf_counter(), _read_bytes(), self._waited)
        if self._last is not None:
            dt, nbytes = now[0] - self._last[0], now[1] - self._last[1]
            self.stats = StreamStats(nbytes, nbytes / dt if dt > 0 else 0.0, self.locked,
                                     self.sets.resident_bytes, self.sets.streamed_bytes)
            # the disk's speed while it had reads to do: the token's time less the prefetch thread's waits (its room
            # full while resident layers computed, or nothing left to read), which the plan models on its own
            busy = dt - (now[2] - self._last[2])
            if nbytes >= CALIBRATION_MIN_READ and busy > 0:
                self._speeds.append(nbytes / busy)
        self._last = now
        if not self.locked:
            self._keep_hot()

    def _follow(self, pos: int) -> None:
        """Drop streamed pieces already used; read ahead the next ones (cyclically) as far as the window holds. A
        piece bigger than the window is read ahead in part until compute reaches it, then to its end."""
        n = self._npos
        ahead: list[tuple[Piece, int]] = []
        budget = self.sets.window
        for piece in sorted(self._pieces.values(), key=lambda p: (p.pos - pos) % n):
            if budget <= 0 and ahead:
                break
            # the piece computing now is read to its end: compute faults in all of it anyway, 2 MiB at a time
            ahead.append((piece, piece.nbytes if piece.pos == pos else max(budget, WILLNEED_CHUNK)))
            budget -= piece.nbytes
        keep = {p.pos for p, _ in ahead}
        left = sorted(set(self._fetched) - keep)  # dropped once left behind, read ahead or not: compute faults in
        kept = {self._pieces[at].index for at in keep}  # what was not
        for index in sorted({self._pieces[at].index for at in left if at in self._pieces} - kept):
            self._evict(self._by_index[index])  # the whole unit, out to its edge folios
        for at in left:  # a step of a layer still in use: its inner folios (the edges go with the unit)
            del self._fetched[at]
            if at in self._pieces and self._pieces[at].index in kept:
                self._drop_inner(self._pieces[at])
        for at in keep:
            self._fetched.setdefault(at, 0)
        for piece, room in ahead:
            done, want = self._fetched.get(piece.pos, 0), min(piece.nbytes, room)
            at = 0
            for s in piece.spans:
                for lo in range(s.start, s.end, WILLNEED_CHUNK):
                    size = min(WILLNEED_CHUNK, s.end - lo)
                    if at >= done and at < want:
                        if self._stop or (self._pos is not None and (self._pos - pos) % n > (piece.pos - pos) % n):
                            return  # compute passed this piece already: reading it now only adds pressure
                        self._read_ahead(s.file, lo, size)
                        self._fetched[piece.pos] = at + size
                    at += size

    def _drop_inner(self, piece: Piece) -> None:
        for s in piece.spans:
            lo, hi = -(-s.start // PMD) * PMD, s.end // PMD * PMD
            if hi <= lo:
                continue
            addr = self._in_llama(s.file, lo, hi)
            if addr is not None:
                _libc.madvise(addr, hi - lo, MADV_DONTNEED)
            os.posix_fadvise(self._fds[s.file], lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def _in_llama(self, file: Path, lo: int, hi: int) -> int | None:
        """Where llama.cpp mapped file bytes [lo, hi) (None: not mapped there)."""
        m = self._llama.get(file)
        return m.at(lo, hi) if m is not None and hi > lo else None

    def _read_ahead(self, file: Path, lo: int, size: int) -> None:
        a, b = round_out(lo, lo + size)
        addr = self._in_llama(file, a, b)
        if POPULATE and addr is not None and _libc.madvise(addr, b - a, MADV_POPULATE_READ) == 0:
            return
        os.posix_fadvise(self._fds[file], lo, size, os.POSIX_FADV_WILLNEED)

    def _advise(self, spans: Sequence[Span], advice: int) -> None:
        for s in spans:
            lo, hi = round_in(s.start, s.end)
            addr = self._in_llama(s.file, lo, hi)
            if addr is not None:
                _libc.madvise(addr, hi - lo, advice)

    def _evict(self, unit: Unit) -> None:
        """Unmap the unit from llama.cpp's mapping and drop it from the page cache, to the huge-page folios at its
        edges: the kernel keeps a folio that is still mapped or locked (a neighbour in use, a resident one), and
        drops the rest of one that straddles a unit used before (measured at file/limit 3: 0.82-0.83 GiB read per
        token, against 0.85 with edges rounded in, which left ~2 MiB of every streamed unit cached). An edge folio
        that also holds a streamed unit still to come this token stays for it (0.733-0.736 against 0.760-0.765 GiB
        at 3 over four pairs: in a Llama GGUF's file order, blk.1 then blk.10, most streamed layers border another)."""
        pos = None if self._pos is None else self._pos // len(STEPS)  # the layer computing
        for s in unit.spans:
            lo, hi = round_out(s.start, s.end)
            addr = self._in_llama(s.file, lo, hi)
            if addr is not None:
                _libc.madvise(addr, hi - lo, MADV_DONTNEED)
            lo, hi = drop_range(s, unit.index, self._shared,
                                lambda i: pos is not None and i >= pos and i in self._by_index)
            if hi > lo:
                os.posix_fadvise(self._fds[s.file], lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self in _active:
            _active.remove(self)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._unmap()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._calibrate()

    def _calibrate(self) -> None:
        """Leave the median measured read speed for later plans of models on this filesystem (only from the
        default way of reading: a run with the populate or the huge-page or random advice off measured another)."""
        speeds, self._speeds = sorted(self._speeds), []
        if len(speeds) >= CALIBRATION_MIN_TOKENS and POPULATE and HUGEPAGE and RANDOM:
            from corral.offload.bandwidth import record_stream_bandwidth

            record_stream_bandwidth(self.units[0].spans[0].file, speeds[len(speeds) // 2])


def measured_stream_bytes(units: Sequence[Unit], reserve: int = 0) -> int | None:
    """Inside a memory cgroup, what cannot stay resident given the group's anonymous memory now (after the
    model and context are allocated) and the `reserve` a batch may still write. None: no cgroup."""
    from corral.offload.memlimit import cgroup_memory_limit
    from corral.offload.memory import stream_holdback

    limit = cgroup_memory_limit()
    if limit is None:
        return None
    room = limit.limit - limit.anon - stream_holdback(reserve)  # `choose` adds the read-ahead's room
    return max(0, sum(u.nbytes for u in units) - max(0, room))


__all__ = ["Span", "live_stats", "StreamSets", "StreamStats", "Streamer", "Unit", "choose", "llama_mappings", "units_of",
           "window_for"]
