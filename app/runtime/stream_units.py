"""What a token reads from a GGUF, layer by layer, and which of it stays resident: the streaming engine's plan.

A unit is one step of llama.cpp's graph (a layer, or the output head) with the byte spans of the file it reads;
`choose` picks what streams: a slice (the last part in the file) of as many units as room-sized slices allow, spread
over the token so the disk stays busy while resident layers compute.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.convert.gguf_file import GGUFTensor
from corral.offload.memory import STREAM_STEPS, STREAM_WINDOW_SHARE, stream_step, stream_window

PAGE = os.sysconf("SC_PAGE_SIZE")


def _pmd_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 2 * 1024 * 1024


# The page cache holds a file read through a MADV_HUGEPAGE mapping in folios of this size; dropping a range that
# cuts one drops none of it (the kernel skips a folio partly outside the range), so drops round out to it.
PMD = _pmd_size()
_LAYER = re.compile(r"blk\.(\d+)\.")
SPLIT_MIN = 4 * 1024 * 1024  # streaming this much more than needed is worth splitting a unit for
# the read-ahead room's cap, 1/share of what is missing (offload/memory.stream_window); 0: no cap (an ablation)
WINDOW_SHARE = int(os.environ.get("CORRAL_STREAM_WINDOW_SHARE", str(STREAM_WINDOW_SHARE)))
# CORRAL_STREAM_SLICE=0: whole units stream, spread over the token (see offload/memory.stream_slices)
SLICE = os.environ.get("CORRAL_STREAM_SLICE", "1") != "0"


@dataclass(frozen=True)
class Span:
    """Bytes [start, end) of one file."""

    file: Path
    start: int
    end: int


@dataclass(frozen=True)
class Unit:
    """What one step of the graph reads: layer `index`, or the output head (index = n_layer)."""

    index: int
    spans: tuple[Span, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.end - s.start for s in self.spans)


@dataclass(frozen=True)
class StreamSets:
    """Which units stay resident and which stream (both in the order the graph reads them)."""

    resident: tuple[Unit, ...]
    streamed: tuple[Unit, ...]
    window: int  # bytes read ahead of compute at most

    @property
    def resident_bytes(self) -> int:
        return sum(u.nbytes for u in self.resident)

    @property
    def streamed_bytes(self) -> int:
        return sum(u.nbytes for u in self.streamed)


def row_spans(tensors: Sequence[GGUFTensor]) -> list[Span]:
    """What a token reads one row of: the token embedding."""
    return [Span(Path(t.file), t.offset, t.offset + t.nbytes) for t in tensors if t.name.startswith("token_embd")]


def units_of(tensors: Sequence[GGUFTensor], n_layer: int) -> list[Unit]:
    """Per layer and for the output head, the byte spans read for every token (adjacent tensors merged).
    The token embedding is left out: a token reads one row of it."""
    spans: dict[int, list[Span]] = {}
    for t in tensors:
        if t.name.startswith("token_embd") or t.name.startswith("rope_freqs"):
            continue
        m = _LAYER.match(t.name)
        index = int(m.group(1)) if m else n_layer
        spans.setdefault(index, []).append(Span(Path(t.file), t.offset, t.offset + t.nbytes))
    return [Unit(index, _joined(spans[index], gap=PAGE)) for index in sorted(spans)]


# CORRAL_STREAM_STEPS=0: a streamed layer is read ahead and dropped whole, in file order (one step)
BY_STEP = os.environ.get("CORRAL_STREAM_STEPS", "1") != "0"
STEPS = STREAM_STEPS


@dataclass(frozen=True)
class Piece:
    """What one step of a streamed unit reads: graph position `pos` (layer * len(STEPS) + step; the head's one
    step is n_layer * len(STEPS))."""

    pos: int
    index: int  # the unit's
    spans: tuple[Span, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.end - s.start for s in self.spans)


def step_spans(tensors: Sequence[GGUFTensor]) -> dict[tuple[int, int], tuple[Span, ...]]:
    """(layer, step) -> the byte spans of that step's tensors (adjacent ones joined)."""
    out: dict[tuple[int, int], list[Span]] = {}
    for t in tensors:
        m = _LAYER.match(t.name)
        if m:
            key = (int(m.group(1)), stream_step(t.name) if BY_STEP else 0)
            out.setdefault(key, []).append(Span(Path(t.file), t.offset, t.offset + t.nbytes))
    return {k: _joined(v, gap=PAGE) for k, v in out.items()}


def pieces_of(unit: Unit, steps: dict[tuple[int, int], tuple[Span, ...]]) -> list[Piece]:
    """The unit's bytes by step, in graph order (a unit with no steps known, the output head: one piece)."""
    n = len(STEPS)
    own = [(k[1], sp) for k, sp in steps.items() if k[0] == unit.index]
    pieces = []
    for step, spans in sorted(own, key=lambda kv: kv[0]):
        cut = tuple(Span(a.file, max(a.start, b.start), min(a.end, b.end)) for a in unit.spans for b in spans
                    if a.file == b.file and max(a.start, b.start) < min(a.end, b.end))
        if cut:
            pieces.append(Piece(unit.index * n + step, unit.index, cut))
    return pieces or [Piece(unit.index * n, unit.index, unit.spans)]


def markers(pieces: Iterable[Piece], n_layer: int) -> dict[bytes, int]:
    """The graph nodes the eval callback asks for, with their positions: the node that starts each layer, each
    step of a streamed layer, and the output head's norm (every node asked for ends a piece of the graph's
    computation, where the threads meet: so only the steps that matter)."""
    n = len(STEPS)
    out = {f"{STEPS[0]}-{i}".encode(): i * n for i in range(n_layer)}
    out.update({f"{STEPS[p.pos % n]}-{p.index}".encode(): p.pos for p in pieces if p.index < n_layer})
    out[b"result_norm"] = n_layer * n
    return out


def _joined(spans: Sequence[Span], gap: int = 0) -> tuple[Span, ...]:
    """Spans in file order, those less than `gap` bytes apart (0: overlapping or touching) joined into one."""
    out: list[Span] = []
    for sp in sorted(spans, key=lambda sp: (str(sp.file), sp.start)):
        if out and out[-1].file == sp.file and sp.start - out[-1].end < max(gap, 1):
            out[-1] = Span(sp.file, out[-1].start, max(out[-1].end, sp.end))
        else:
            out.append(sp)
    return tuple(out)


def choose(units: Sequence[Unit], stream_bytes: int, window: int, least: int | None = None) -> StreamSets:
    """Stream `stream_bytes` + `window` (the read-ahead needs room too, to within `SPLIT_MIN`), spread evenly over
    the token so the disk is busy while resident layers compute: the last part (in the file) of as many units as
    slices of at least `least` bytes allow (default the room, `window`; see `sliced`), or with `least` 0 whole
    units."""
    least = (window if SLICE else 0) if least is None else least
    total = sum(u.nbytes for u in units)
    want = min(total, stream_bytes + window)
    if least and 0 < want < total:
        sets = sliced(units, want, window, least)
        if sets is not None:
            return sets
    return _whole(units, want, window)


def sliced(units: Sequence[Unit], want: int, window: int, least: int) -> StreamSets | None:
    """`want` bytes streamed as slices, each unit's last part (in the file) cut at a huge-page folio: going
    through the units in graph order, a unit streams what the token owes so far (`want` spread evenly over its
    bytes) once that is `least` or more (the last unit: whatever is owed), so a slice streams from every unit when
    a unit's share is that big and from every second or third one when it is not. A cut rounds a slice to a
    folio, and the next slice owes that much more or less. None when the units are too small to slice."""
    shares = _shares([u.nbytes for u in units], want, max(least, window))
    resident: list[Unit] = []
    streamed: list[Unit] = []
    done = 0
    owes = 0.0
    for i, (u, share) in enumerate(zip(units, shares)):
        last = i == len(units) - 1
        owes += share
        owed = int(owes + 0.5) - done
        if owed < least and (not last or owed <= 0):
            resident.append(u)
            continue
        # cut at the nearest folio; the last unit's rounds up, so what streams is never short
        kept, rest = split(u, max(0, u.nbytes - owed + (0 if last else PMD // 2)), align=PMD)
        if kept.spans:
            resident.append(kept)
        if rest.spans:
            streamed.append(rest)
            done += rest.nbytes
    if done < want:  # units smaller than the slices they owe
        return None
    return StreamSets(tuple(resident), tuple(streamed), window)


def _shares(sizes: Sequence[int], want: int, cap: int) -> list[float]:
    """What each unit owes of `want`: the same fraction of each, but at most `cap` bytes of any (a unit much bigger
    than the rest, the output head, would otherwise owe a slice its read-ahead room cannot hold ahead), the
    others owing more instead; uncapped when capped units cannot make up `want`."""
    total = sum(sizes)
    if cap <= 0 or sum(min(n, cap) for n in sizes) < want:
        return [want * n / total for n in sizes]
    lo, hi = want / total, 1.0
    for _ in range(60):  # the fraction f with sum(min(f * n, cap)) = want
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(min(mid * n, cap) for n in sizes) < want else (lo, mid)
    return [min(hi * n, cap) for n in sizes]


def _whole(units: Sequence[Unit], want: int, window: int) -> StreamSets:
    """Whole units streamed, spread over the token. Whole units overshoot by up to a unit (the output head of a
    Llama 3 weighs 2-9 layers): the biggest streamed unit is then split, its first part resident."""
    total = sum(u.nbytes for u in units)
    frac = want / total if total else 0.0
    streamed: list[Unit] = []
    done = seen = 0
    for u in units:
        seen += u.nbytes
        if done < want and done + u.nbytes / 2 <= frac * seen:
            streamed.append(u)
            done += u.nbytes
    for u in reversed(units):  # short (big units): stream more from the end
        if done >= want:
            break
        if u not in streamed:
            streamed.append(u)
            done += u.nbytes
    chosen = {u.index for u in streamed}
    resident = [u for u in units if u.index not in chosen]
    streaming = [u for u in units if u.index in chosen]
    over = done - want
    if streaming and over >= SPLIT_MIN:  # whole units overshoot: the biggest keeps a prefix resident
        big = max(streaming, key=lambda u: u.nbytes)
        kept, rest = split(big, over)
        if kept.spans and rest.spans:
            resident = sorted([*resident, kept], key=lambda u: u.index)
            streaming = [rest if u is big else u for u in streaming]
    return StreamSets(tuple(resident), tuple(streaming), window)


def rebalance(sets: StreamSets, stream_bytes: int, window: int) -> tuple[StreamSets, tuple[Unit, ...],
                                                                          tuple[Unit, ...]]:
    """New sets that stream `stream_bytes` + `window` (to within SPLIT_MIN), changed as little as possible: the
    sets, the pieces that joined the resident set and the pieces that left it. More room (a draft closed): some
    streamed units, spread over the token, stay resident; less (a long batch wrote more of the compute buffer):
    some resident ones, spread likewise, stream."""
    want = stream_bytes + window
    have = sets.streamed_bytes
    if abs(want - have) < SPLIT_MIN:
        return sets, (), ()
    if want < have:
        new = choose(sets.streamed, stream_bytes, window)
        return StreamSets(merged((*sets.resident, *new.resident)), new.streamed, window), new.resident, ()
    moved = choose(sets.resident, want - have, 0, window if SLICE else 0)
    return (StreamSets(moved.resident, merged((*sets.streamed, *moved.streamed)), window), (),
            moved.streamed)


def merged(units: Sequence[Unit]) -> tuple[Unit, ...]:
    """Units with the same index (pieces of a split unit) joined, in index order, touching spans merged."""
    spans: dict[int, list[Span]] = {}
    for u in units:
        spans.setdefault(u.index, []).extend(u.spans)
    return tuple(Unit(index, _joined(spans[index])) for index in sorted(spans))


def split(unit: Unit, nbytes: int, align: int = PAGE) -> tuple[Unit, Unit]:
    """The unit's first ~`nbytes` (cut at a multiple of `align` in the file, or of a page where the span holds no
    such multiple) and the rest, both with its index."""
    head: list[Span] = []
    tail: list[Span] = []
    left = nbytes
    for s in unit.spans:
        if left <= 0:
            tail.append(s)
            continue
        cut = (s.start + left) // align * align
        if cut <= s.start:
            cut = (s.start + left) // PAGE * PAGE
        if cut >= s.end:
            head.append(s)
            left -= s.end - s.start
            continue
        if cut > s.start:
            head.append(Span(s.file, s.start, cut))
        tail.append(Span(s.file, max(cut, s.start), s.end))
        left = 0
    return Unit(unit.index, tuple(head)), Unit(unit.index, tuple(tail))


def round_in(start: int, end: int) -> tuple[int, int]:
    return -(-start // PAGE) * PAGE, end // PAGE * PAGE


def round_out(start: int, end: int, to: int = PAGE) -> tuple[int, int]:
    return start // to * to, -(-end // to) * to


def shared_folios(units: Sequence[Unit], folio: int = PMD) -> dict[tuple[Path, int], frozenset[int]]:
    """The huge-page folios that hold the edges of more than one unit (file, folio start -> the units)."""
    users: dict[tuple[Path, int], set[int]] = {}
    for u in units:
        for s in u.spans:
            for at in {s.start // folio * folio, (s.end - 1) // folio * folio}:
                users.setdefault((s.file, at), set()).add(u.index)
    return {k: frozenset(v) for k, v in users.items() if len(v) > 1}


def drop_range(span: Span, index: int, shared: dict[tuple[Path, int], frozenset[int]],
               later: Callable[[int], bool], folio: int = PMD) -> tuple[int, int]:
    """What to drop of unit `index`'s `span` once used: out to the folios at its edges (the kernel reads and drops
    whole folios), except an edge folio that holds bytes of a unit `later` says is still to come this token: that
    unit would read the folio again, so it stays for it (and that unit's drop takes it)."""
    lo, hi = round_out(span.start, span.end, folio)
    if any(later(i) for i in shared.get((span.file, lo), ()) if i != index):
        lo += folio
    if hi - folio >= lo and any(later(i) for i in shared.get((span.file, hi - folio), ()) if i != index):
        hi -= folio
    return lo, max(lo, hi)


def window_for(units: Sequence[Unit], missing: int, steps: dict[tuple[int, int], tuple[Span, ...]] | None = None) -> int:
    """Read-ahead room for streaming `missing` bytes of these units (offload/memory.stream_window). With the units'
    `steps`, the room a step computing needs is its largest piece, not the whole unit: a step is dropped once used."""
    if not units:
        return 0
    sizes = sorted(u.nbytes for u in units)
    if not steps:
        return stream_window(sizes[len(sizes) // 2], sum(sizes), missing, WINDOW_SHARE)
    largest = sorted(max(p.nbytes for p in pieces_of(u, steps)) for u in units)
    return stream_window(largest[len(largest) // 2], sum(sizes), missing, WINDOW_SHARE)


@dataclass(frozen=True)
class Mapping:
    """Where a process mapped file bytes [offset, offset + length)."""

    addr: int
    offset: int
    length: int

    def at(self, lo: int, hi: int) -> int | None:
        """The address of file bytes [lo, hi); None when the mapping does not hold all of them."""
        if lo < self.offset or hi > self.offset + self.length:
            return None
        return self.addr + lo - self.offset


def llama_mappings(files: Sequence[Path], maps: str | None = None) -> dict[Path, Mapping]:
    """llama.cpp's mapping of each file, from /proc/self/maps: the largest shared one (llama.cpp maps from the
    page holding the first tensor, so a 128K-vocabulary header is not part of it)."""
    if maps is None:
        maps = Path("/proc/self/maps").read_text()
    want = {os.stat(f).st_ino: Path(f) for f in files}
    best: dict[Path, Mapping] = {}
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[1].endswith("s") or not parts[4].isdigit():
            continue
        path = want.get(int(parts[4]))
        if path is None:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if path not in best or hi - lo > best[path].length:
            best[path] = Mapping(lo, int(parts[2], 16), hi - lo)
    return best


__all__ = ["BY_STEP", "PAGE", "PMD", "SPLIT_MIN", "STEPS", "Mapping", "Piece", "Span", "markers", "StreamSets", "Unit", "choose", "llama_mappings", "merged",
           "pieces_of", "rebalance", "round_in", "round_out", "row_spans", "sliced", "split", "step_spans", "units_of",
           "window_for"]
