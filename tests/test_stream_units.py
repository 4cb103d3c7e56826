"""Which units stream and which stay resident, and where llama.cpp mapped the file (no model loaded)."""

from __future__ import annotations

from pathlib import Path

from corral.app.runtime.stream_units import (
    PAGE,
    PMD,
    SPLIT_MIN,
    Span,
    Unit,
    choose,
    drop_range,
    llama_mappings,
    round_out,
    shared_folios,
    split,
)
from tests.helpers.stream import units_of_sizes as _units


def test_choose_streams_enough_spread_over_the_token() -> None:
    units = _units([100] * 10 + [50])
    sets = choose(units, stream_bytes=380, window=100)
    assert sets.streamed_bytes >= 480 and sets.resident_bytes + sets.streamed_bytes == 1050
    got = [u.index for u in sets.streamed]
    assert got != list(range(len(got)))  # not one block: resident layers sit between streamed ones
    assert max(b - a for a, b in zip(got, got[1:])) <= 2
    assert choose(units, 0, 0).streamed == () and len(choose(units, 10_000, 0).resident) == 0


def test_choose_splits_the_biggest_streamed_unit() -> None:
    """Whole units overshoot by up to a unit (a Llama 3 head is ~8 layers): the biggest streamed unit is split,
    its first part resident, so what streams is what was asked for to within SPLIT_MIN."""
    mib = 1 << 20
    units = _units([30 * mib] * 8 + [250 * mib])
    want = 300 * mib
    sets = choose(units, stream_bytes=want - 64 * mib, window=64 * mib)
    assert want <= sets.streamed_bytes < want + SPLIT_MIN
    assert sets.resident_bytes + sets.streamed_bytes == sum(u.nbytes for u in units)
    head_r = [u for u in sets.resident if u.index == 8]
    head_s = [u for u in sets.streamed if u.index == 8]
    assert len(head_r) == len(head_s) == 1  # the head: first part resident, the rest streams
    assert head_r[0].spans[-1].end == head_s[0].spans[0].start and head_s[0].spans[0].start % PAGE == 0


def test_window_is_a_share_of_what_is_missing_but_holds_a_unit() -> None:
    """The read-ahead room is read again every token: two units or 64 MiB when much is missing, less when little
    is (never less than the unit computing or the floor), none when nothing is."""
    from corral.offload.memory import (
        STREAM_WINDOW_FLOOR,
        STREAM_WINDOW_MIN,
        STREAM_WINDOW_SHARE,
        stream_window,
    )

    mib = 1024 * 1024
    unit, total = 29 * mib, 25 * 29 * mib
    assert stream_window(unit, total, 0) == 0
    assert stream_window(unit, total, total) == STREAM_WINDOW_MIN  # a small model: at least 64 MiB
    assert stream_window(unit, total, 400 * mib) == 400 * mib // STREAM_WINDOW_SHARE
    assert stream_window(unit, total, 10 * mib) == STREAM_WINDOW_FLOOR
    assert stream_window(40 * mib, total, 10 * mib) == 40 * mib  # a step bigger than the floor
    big = 1200 * mib  # a 405B layer in Q2_K: two of them
    assert stream_window(big, 127 * big, 30 * 1024 * mib) == 2 * big


def test_split_cuts_at_a_page_across_spans() -> None:
    f = Path("m.gguf")
    unit = Unit(3, (Span(f, 100, 5000), Span(f, 9000, 30000)))
    head, tail = split(unit, 10_000)
    assert head.index == tail.index == 3
    assert head.spans == (Span(f, 100, 5000), Span(f, 9000, 12288))  # 4900 + 5100 bytes: cut at page 3
    assert tail.spans == (Span(f, 12288, 30000),)
    head, tail = split(unit, 10)  # less than to the first page boundary: nothing stays
    assert head.spans == () and tail.spans == unit.spans


def test_llama_mapping_is_the_largest_shared_one(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    ino = f.stat().st_ino
    maps = (f"7f0000000000-7f0000001000 r--s 00000000 fd:01 {ino}   {f}\n"
            f"7f1000000000-7f1000400000 r--s 00000000 fd:01 {ino}   {f}\n"
            f"7f4000000000-7f4000900000 r--p 00000000 fd:01 {ino}   {f}\n"  # private: not llama.cpp's weights
            "7f3000000000-7f3000800000 r-xp 00000000 fd:01 999999 /usr/lib/libc.so\n")
    m = llama_mappings([f], maps)[f]
    assert (m.addr, m.offset, m.length) == (0x7F1000000000, 0, 0x400000)
    # llama.cpp maps from the page of the first tensor: a big vocabulary's header is left out
    maps += f"7f2000000000-7f2000800000 r--s 00778000 fd:01 {ino}   {f}\n"
    m = llama_mappings([f], maps)[f]
    assert m.at(0x778000, 0x779000) == 0x7F2000000000 and m.at(0x800000, 0x801000) == 0x7F2000088000
    assert m.at(0x777000, 0x779000) is None and m.at(0x778000, 0x778000 + 0x800001) is None


def test_rebalance_moves_as_little_as_it_can() -> None:
    from corral.app.runtime.stream_units import merged, rebalance

    mib = 1 << 20
    units = _units([30 * mib] * 8 + [100 * mib])
    sets = choose(units, 120 * mib, 40 * mib)
    same, grown, shrunk = rebalance(sets, 120 * mib + SPLIT_MIN // 4, 40 * mib)
    assert same is sets and grown == shrunk == ()
    more, grown, shrunk = rebalance(sets, 200 * mib, 40 * mib)
    assert not grown and shrunk and more.streamed_bytes >= 240 * mib
    assert {u.index for u in more.resident} <= {u.index for u in sets.resident}  # nothing streamed became resident
    assert more.resident_bytes + more.streamed_bytes == sum(u.nbytes for u in units)
    f = units[0].spans[0].file
    assert merged([Unit(2, (Span(f, 50, 80),)), Unit(1, (Span(f, 0, 10),)), Unit(2, (Span(f, 10, 50),))]) == (
        Unit(1, (Span(f, 0, 10),)), Unit(2, (Span(f, 10, 80),)))


def _token(units: list[Unit], later_rule: bool, folio: int) -> tuple[int, set[tuple[Path, int]]]:
    """One token over streamed `units` in compute order: each reads the folios its bytes lie in (those not cached)
    and is then dropped by `drop_range`. Returns folios read and what is left cached."""
    shared = shared_folios(units, folio)
    cached: set[tuple[Path, int]] = set()
    reads = 0
    for u in units:
        need = {(s.file, at) for s in u.spans for at in range(*round_out(s.start, s.end, folio), folio)}
        reads += len(need - cached)
        cached |= need
        for s in u.spans:
            lo, hi = drop_range(s, u.index, shared, (lambda i, me=u.index: i > me) if later_rule else (lambda i: False),
                                folio)
            cached -= {(s.file, at) for at in range(lo, hi, folio)}
    return reads, cached


def test_a_folio_two_streamed_layers_share_is_read_once_a_token() -> None:
    folio = 2 * 1024 * 1024
    order = [0, 1, 10, 11, 2, 3, 12, 4]  # file order of layer indices
    sizes = [3 * folio + 4096 * (k + 1) for k in range(len(order))]  # edges fall inside folios
    units = _units(sizes, order)
    distinct = len({(s.file, at) for u in units for s in u.spans for at in range(*round_out(s.start, s.end, folio),
                                                                                  folio)})
    reads, left = _token(units, later_rule=True, folio=folio)
    assert reads == distinct and not left  # each folio read once, nothing left cached after the token
    reads_plain, left_plain = _token(units, later_rule=False, folio=folio)
    assert not left_plain and reads_plain == distinct + len(shared_folios(units, folio))


def test_drop_range_keeps_an_edge_folio_for_a_layer_still_to_come() -> None:
    folio = 2 * 1024 * 1024
    a, b = _units([folio + 100, folio], [0, 7])  # b starts 100 bytes into a's second folio
    shared = shared_folios([a, b], folio)
    assert shared == {(Path("/m.gguf"), folio): frozenset({0, 7})}
    assert drop_range(a.spans[0], 0, shared, lambda i: i == 7, folio) == (0, folio)  # 7 comes later: kept for it
    assert drop_range(a.spans[0], 0, shared, lambda i: False, folio) == (0, 2 * folio)
    assert drop_range(b.spans[0], 7, shared, lambda i: False, folio) == (folio, 3 * folio)
    tiny = _units([100, 100, 100], [3, 4, 5])  # three units inside one folio
    middle = next(u for u in tiny if u.index == 4)
    lo, hi = drop_range(middle.spans[0], 4, shared_folios(tiny, folio), lambda i: i == 5, folio)
    assert lo >= hi


def test_slices_spread_what_streams_over_many_units() -> None:
    """A small share streams as slices of at least `least` bytes (by default the read-ahead room) from every second
    or third unit (not two whole units), each the unit's last part cut at a folio; a large share as a slice of every unit; both stream what was
    asked for (never less, at most a folio more) and leave the rest resident."""
    mib = 1 << 20
    units = _units([116 * mib] * 16 + [500 * mib])
    total = sum(u.nbytes for u in units)
    for want, at_least in ((260 * mib, 8), (1600 * mib, 17)):
        sets = choose(units, want - 32 * mib, 32 * mib, least=16 * mib)
        assert want <= sets.streamed_bytes < want + PMD
        assert sets.resident_bytes + sets.streamed_bytes == total
        slices = {u.index for u in sets.streamed}
        assert len(slices) == len(sets.streamed) >= at_least
        assert all(s.nbytes >= 16 * mib for s in sets.streamed)
        by_index = {u.index: u for u in units}
        for s in sets.streamed:  # the unit's last part, from a folio boundary to its end
            assert s.spans[-1].end == by_index[s.index].spans[-1].end and s.spans[0].start % PMD == 0
        got = sorted(slices)
        assert max(b - a for a, b in zip(got, got[1:])) <= 3  # no long resident stretch
    whole = choose(units, 260 * mib - 32 * mib, 32 * mib, least=0)  # the ablation: whole units
    assert len(whole.streamed) <= 3


def test_slices_fall_back_to_whole_units_when_units_are_small() -> None:
    units = _units([100] * 10 + [50])
    assert choose(units, 380, 100, least=16 << 20).streamed_bytes >= 480
    mib = 1 << 20
    small = _units([29 * mib] * 24 + [250 * mib])  # layers about the room: slices of the room are whole layers
    sets = choose(small, 185 * mib - 32 * mib, 32 * mib)
    assert sum(1 for s in sets.streamed if s.nbytes < 28 * mib) <= 2


def test_no_slice_outgrows_the_read_ahead_room_when_others_can_take_more() -> None:
    """A unit far bigger than the rest (a Llama 3 output head is ~4 layers) would owe a slice its read-ahead room
    cannot hold ahead: it streams at most the room, and the layers stream more instead; with much missing (slices
    bigger than the room everywhere) every unit streams the same share."""
    mib = 1 << 20
    units = _units([116 * mib] * 16 + [500 * mib])
    sets = choose(units, 268 * mib, 32 * mib, least=16 * mib)
    head = [s for s in sets.streamed if s.index == 16]
    assert head and head[0].nbytes <= 32 * mib + PMD and sets.streamed_bytes >= 300 * mib
    assert len(sets.streamed) == 17  # a slice of every layer: 16.7 MiB each
    big = choose(units, 1100 * mib, 32 * mib, least=16 * mib)
    shares = {s.index: s.nbytes / by.nbytes for s in big.streamed for by in units if by.index == s.index}
    assert max(shares.values()) - min(shares.values()) < 0.02


def test_rebalance_moves_slices_both_ways() -> None:
    """Sliced sets follow the group both ways: less to stream turns slices (or their first parts) resident, more
    streams more of the resident parts; every byte is in exactly one set, a unit's parts joined."""
    from corral.app.runtime.stream_units import rebalance

    mib = 1 << 20
    units = _units([116 * mib] * 16 + [500 * mib])
    total = sum(u.nbytes for u in units)
    sets = choose(units, 600 * mib, 32 * mib)
    for want in (300 * mib, 900 * mib):
        new, grown, shrunk = rebalance(sets, want, 32 * mib)
        assert (bool(grown), bool(shrunk)) == ((True, False) if want < 600 * mib else (False, True))
        assert want + 32 * mib <= new.streamed_bytes < want + 32 * mib + SPLIT_MIN + PMD
        assert new.resident_bytes + new.streamed_bytes == total
        for part in (new.resident, new.streamed):
            assert len({u.index for u in part}) == len(part)
        covered = sorted((s.start, s.end) for u in (*new.resident, *new.streamed) for s in u.spans)
        assert all(a[1] <= b[0] for a, b in zip(covered, covered[1:]))  # no byte in both sets
