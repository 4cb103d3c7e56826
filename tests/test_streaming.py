"""The streaming engine: which weights stay resident, where llama.cpp mapped the file, and identical tokens."""

from __future__ import annotations

import ctypes
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from corral.app.runtime import stream_setup, streaming
from corral.app.runtime.api import SamplingSettings
from corral.app.runtime.engine import load_engine
from corral.app.runtime.stream_units import PAGE, SPLIT_MIN, STEPS, StreamSets, pieces_of, step_spans
from corral.app.runtime.streaming import Span, Streamer, Unit, llama_mappings, units_of
from corral.convert.gguf_file import read_gguf
from corral.offload.memory import stream_step
from tests.helpers.engine import cpu_plan, write_tiny_gguf
from tests.helpers.stream import greedy_in_ram
from tests.helpers.stream import units_of_sizes as _units

N_LAYERS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("stream") / "s.gguf", hidden=256, n_heads=4, ffn=512,
                           n_layers=N_LAYERS, layer_dtype=np.float32)


class _RefusingLibc:
    def __init__(self, libc: object) -> None:
        self._libc = libc

    def mlock(self, *_args: object) -> int:
        return -1

    def __getattr__(self, name: str) -> object:
        return getattr(self._libc, name)


def test_units_follow_the_graph_and_skip_the_embedding(model: Path) -> None:
    mf = read_gguf(model)
    units = units_of(mf.tensors, N_LAYERS)
    assert [u.index for u in units] == [*range(N_LAYERS), N_LAYERS]
    per_token = sum(t.nbytes for t in mf.tensors if not t.name.startswith("token_embd"))
    assert sum(u.nbytes for u in units) == per_token  # merged spans cover exactly the tensors read per token
    assert all(len(u.spans) == 1 for u in units[:-1])  # a layer's tensors are adjacent in the file
    out = next(t for t in mf.tensors if t.name == "output.weight")
    assert any(s.start <= out.offset and out.offset + out.nbytes <= s.end for s in units[-1].spans)


def test_read_ahead_reads_the_computing_unit_whole_and_the_next_within_the_window(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit computing now is read to its end (compute faults all of it in anyway); the ones after it only as
    far as the window holds; what compute has left behind is dropped."""
    mib = 1024 * 1024
    units = _units([10 * mib] * 6 + [100 * mib])  # six layers and a head bigger than the window
    s = Streamer(units, stream_bytes=0, n_layer=6, lock=False)
    streamed = [units[i] for i in (1, 3, 5, 6)]
    s._use(StreamSets(tuple(u for u in units if u not in streamed), tuple(streamed), 25 * mib))
    reads: list[tuple[int, int]] = []
    dropped: list[int] = []
    monkeypatch.setattr(s, "_read_ahead", lambda _f, lo, size: reads.append((lo, size)))
    monkeypatch.setattr(s, "_evict", lambda unit: dropped.append(unit.index))

    def read_of(unit: Unit) -> int:
        span = unit.spans[0]
        return sum(size for lo, size in reads if span.start <= lo < span.end)

    n = len(STEPS)  # graph positions: layer * len(STEPS) + step; these units have one step each
    s._follow(6 * n)  # computing the head: all 100 MiB of it, nothing after (the window is used up)
    assert read_of(units[6]) == 100 * mib and sum(size for _, size in reads) == 100 * mib
    reads.clear()
    s._follow(0)  # a new token: 1 and 3 whole, 5 in part (25 MiB of window); the head is behind: dropped
    assert [read_of(units[i]) for i in (1, 3, 5, 6)] == [10 * mib, 10 * mib, streaming.WILLNEED_CHUNK, 0]
    assert dropped == [6]
    reads.clear()
    s._follow(5 * n)  # 5 computing: its rest; then the head as far as the window goes; 1 and 3 dropped
    assert read_of(units[5]) == 10 * mib - streaming.WILLNEED_CHUNK
    assert read_of(units[6]) == 2 * streaming.WILLNEED_CHUNK  # 15 MiB of window left, in 8 MiB pieces
    assert dropped == [6, 1, 3]


def test_streamer_finds_llamas_mapping_past_a_big_header(tmp_path: Path) -> None:
    """A real Llama 3 header (128K-token vocabulary) is megabytes: llama.cpp's mapping then starts past it, and
    the streamer must still find it (or it cannot populate, advise or drop anything there)."""
    from llama_cpp import Llama

    path = write_tiny_gguf(tmp_path / "big-header.gguf")  # the real Llama 3 tokenizer
    first = min(t.offset for t in read_gguf(path).tensors)
    assert first > 4 * PAGE  # the header is several pages
    llm = Llama(model_path=str(path), n_ctx=64, verbose=False)
    try:
        m = llama_mappings([path])[path]
        assert m.at(first, first + 1) is not None
        addr = m.at(first // PAGE * PAGE, first // PAGE * PAGE + PAGE)
        data = ctypes.string_at(addr, PAGE)
        with open(path, "rb") as fh:
            fh.seek(first // PAGE * PAGE)
            assert data == fh.read(PAGE)  # the address really holds those file bytes
    finally:
        llm.close()


def test_no_streamer_unless_the_plan_streams(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mf = read_gguf(model)
    plan = cpu_plan(n_ctx=256)
    assert stream_setup.for_plan(plan, mf, plan.load) is None
    streams = replace(plan, disk_stream_bytes=1)
    assert stream_setup.for_plan(streams, mf, replace(plan.load, use_mmap=False)) is None
    no_gpu = stream_setup.for_plan(streams, mf, replace(plan.load, n_gpu_layers=-1))
    assert no_gpu is not None and len(no_gpu.units) == N_LAYERS + 1  # no GPU: -ngl changes nothing
    gpu = replace(streams, devices=(*plan.devices, replace(plan.devices[0], name="GPU0", kind="gpu")))
    assert stream_setup.for_plan(gpu, mf, replace(plan.load, n_gpu_layers=-1)) is None  # all on the GPU
    part = stream_setup.for_plan(gpu, mf, replace(plan.load, n_gpu_layers=2))
    assert part is not None and [u.index for u in part.units] == list(range(N_LAYERS - 1))  # head + last layer
    monkeypatch.setenv("CORRAL_STREAMING", "0")
    assert stream_setup.for_plan(streams, mf, plan.load) is None


@pytest.mark.parametrize("lock_refused", [False, True])
def test_streaming_engine_gives_the_same_greedy_tokens(model: Path, lock_refused: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if lock_refused:  # RLIMIT_MEMLOCK too small: the resident set is kept hot with advice instead
        monkeypatch.setattr(streaming, "_libc", _RefusingLibc(streaming._libc))
    settings = SamplingSettings(temperature=0.0, max_tokens=24)
    want, want_tokens = greedy_in_ram(model, "Once upon a time", settings)
    total = sum(u.nbytes for u in units_of(read_gguf(model).tensors, N_LAYERS))
    engine = load_engine(model, plan=cpu_plan(n_ctx=256, disk_stream_bytes=total // 2))
    try:
        s = engine.streamer
        assert s is not None and s.sets.streamed and s.sets.resident
        assert s.locked is not lock_refused and len(s._own) == (0 if lock_refused else 1)
        got = engine.complete("Once upon a time", settings).text
        assert list(engine.last_completion_tokens) == want_tokens and got == want
        assert s.positions >= 24 * (N_LAYERS + 1)  # the eval callback saw every layer of every token
        assert s.stats.streamed_bytes == s.sets.streamed_bytes
        if THP.is_dir():  # streamed layers fault in 4 MiB at a time; the resident ones keep the default
            assert all({"hg", "rr"} <= set(_vm_flags(_address(s, u))) for u in s.sets.streamed)
            assert not any("hg" in _vm_flags(_address(s, u)) for u in s.sets.resident)
        embd = next(t for t in read_gguf(model).tensors if t.name == "token_embd.weight")
        assert "rr" in _vm_flags(_address(s, Unit(-1, (Span(model, embd.offset, embd.offset + embd.nbytes),))))
    finally:
        engine.close()
    assert engine.streamer is None


THP = Path("/sys/kernel/mm/transparent_hugepage")


def _address(s: Streamer, unit: Unit) -> int:
    """Where llama.cpp mapped the middle page of `unit`'s biggest span."""
    span = max(unit.spans, key=lambda sp: sp.end - sp.start)
    page = (span.start + span.end) // 2 // PAGE * PAGE
    addr = s._in_llama(span.file, page, page + PAGE)
    assert addr is not None
    return addr


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `addr` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_plan_overlaps_disk_reads_with_compute() -> None:
    from corral.offload import throughput
    from corral.offload.api import PlanOptions, plan_model
    from corral.offload.hardware import Hardware

    hw = Hardware(ram_total=64 * 2**30, ram_available=60 * 2**30, cpu_cores=16, cpu_threads=32, disk_bandwidth=3e9)
    p = plan_model("llama-3.1-405b", PlanOptions(quant="Q4_K_M", n_ctx=4096), hw)
    tiers = p.time_per_token
    disk_s = throughput.disk_read_seconds(p.disk_stream_bytes, hw)
    assert p.disk_stream_bytes > 100 * 2**30 and disk_s == pytest.approx(p.disk_stream_bytes * throughput.STREAM_READ_OVERHEAD / 3e9)
    assert tiers["disk"] == pytest.approx(max(0.0, disk_s - tiers["CPU"]))  # compute hides part of the reads
    assert 1 / p.tokens_per_second == pytest.approx(sum(tiers.values()))
    assert 1 / p.tokens_per_second >= max(disk_s, tiers["CPU"])
    assert any("plain mmap" in w for w in p.warnings)


def test_plain_mmap_reads_more_than_what_does_not_fit() -> None:
    from corral.offload.throughput import MMAP_KEPT_FRACTION, mmap_read_bytes

    gib = 2**30
    assert mmap_read_bytes(10 * gib, 12 * gib) == 0
    assert mmap_read_bytes(10 * gib, 6 * gib) == int(10 * gib - MMAP_KEPT_FRACTION * 6 * gib)
    assert mmap_read_bytes(10 * gib, 6 * gib) > 10 * gib - 6 * gib  # an LRU sweep loses most of the room


def test_memory_view_shows_the_streamed_tier_live(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from corral.offload.api import PlanOptions, plan_model
    from corral.offload.hardware import Hardware
    from corral.tui.memory_view import LiveUsage, probe_live_usage, render_memory

    monkeypatch.setattr(streaming, "live_stats", lambda: streaming.StreamStats(3 * 2**30, 2.5e9, True, 1, 2))
    live = probe_live_usage()
    assert (live.disk_read_per_token, live.disk_read_speed) == (3 * 2**30, 2.5e9) and live.rss_bytes > 0
    monkeypatch.setattr(streaming, "live_stats", lambda: None)
    assert probe_live_usage().disk_read_per_token is None
    hw = Hardware(ram_total=64 * 2**30, ram_available=60 * 2**30, disk_bandwidth=3e9)
    plan = plan_model("llama-3.1-405b", PlanOptions(quant="Q4_K_M", n_ctx=4096), hw)
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render_memory(plan, replace(LiveUsage(2**30), disk_read_per_token=3 * 2**30, disk_read_speed=2.5e9)))
    assert "3.0 GiB read per token at 2.50 GB/s" in console.export_text()
    console.print(render_memory(plan, LiveUsage(2**30)))
    assert "read via mmap" in console.export_text()


def test_refresh_grows_and_shrinks_the_resident_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """More room (a draft closed): streamed units join the resident set. Less (a long batch wrote more of the
    compute buffer than was held back): resident pieces, spread over the token, leave it: advised and dropped."""
    mib = 1 << 20
    units = _units([30 * mib] * 12 + [60 * mib])
    s = Streamer(units, stream_bytes=200 * mib, n_layer=12, lock=False)
    monkeypatch.setattr(s, "_keep_hot", lambda: None)
    left: list[int] = []
    monkeypatch.setattr(s, "_evict", lambda u: left.append(u.nbytes))
    monkeypatch.setattr(s, "_advise_streamed", lambda u: None)
    total = sum(u.nbytes for u in units)
    before, streamed = {u.index for u in s.sets.resident}, s.sets.streamed_bytes
    monkeypatch.setattr(streaming, "measured_stream_bytes", lambda *_: 100 * mib)
    s.refresh()
    s._apply_refresh()
    grown = {u.index for u in s.sets.resident}
    assert before < grown and not s._refresh and not left
    window = streaming.window_for(units, 100 * mib)
    assert 100 * mib + window <= s.sets.streamed_bytes < min(streamed, 100 * mib + window + SPLIT_MIN)
    assert s.sets.resident_bytes + s.sets.streamed_bytes == total
    assert set(s._order) == {u.index for u in s.sets.streamed}
    monkeypatch.setattr(streaming, "measured_stream_bytes", lambda *_: 100 * mib + SPLIT_MIN // 2)
    s._apply_refresh()  # within SPLIT_MIN of what streams: nothing moves
    assert {u.index for u in s.sets.resident} == grown
    monkeypatch.setattr(streaming, "measured_stream_bytes", lambda *_: 250 * mib)
    s._apply_refresh()
    window = streaming.window_for(units, 250 * mib)
    assert 250 * mib + window <= s.sets.streamed_bytes < 250 * mib + window + SPLIT_MIN
    assert s.sets.resident_bytes + s.sets.streamed_bytes == total and sum(left) >= 150 * mib
    assert len(s._order) == len(set(s._order))  # a split unit's pieces stream as one unit
    resident = [u.index for u in s.sets.resident]
    assert resident and max((b - a for a, b in zip(resident, resident[1:])), default=0) <= 4  # spread, not a block


def test_a_bigger_batch_resizes_the_sets_at_the_next_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch bigger than any before wrote more of the compute buffer: at the next token boundary the streamer
    measures the group again (with only the reserve no batch wrote held back); otherwise only every few seconds."""
    units = _units([100] * 6)
    s = Streamer(units, stream_bytes=300, n_layer=5, lock=False, reserve=5120, touched=lambda n: 10 * n)
    monkeypatch.setattr(s, "_keep_hot", lambda: None)
    asked: list[int] = []
    monkeypatch.setattr(streaming, "measured_stream_bytes", lambda _units, reserve=0: asked.append(reserve))
    s._token_boundary()
    assert asked == []
    s.largest_batch = 13
    s._token_boundary()
    s._token_boundary()
    assert asked == [5120 - 130]
    s._sized_at -= streaming.REMEASURE_S + 1  # and every few seconds anyway: the heap may have grown
    s._token_boundary()
    assert asked == [5120 - 130] * 2


def test_dropping_a_unit_rounds_out_to_huge_page_folios(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel skips a large folio that a drop only partly covers: drops round out to PMD-sized folios (what is
    still mapped or locked there, a neighbour in use or a resident unit, the kernel keeps)."""
    from corral.app.runtime.stream_units import PMD

    f = Path("/m.gguf")
    unit = Unit(0, (Span(f, PMD + 12_345, 3 * PMD + 777),))
    s = Streamer([unit], stream_bytes=0, n_layer=1, lock=False)
    s._fds[f] = -1
    dropped: list[tuple[int, int]] = []
    monkeypatch.setattr(streaming.os, "posix_fadvise", lambda _fd, lo, n, _advice: dropped.append((lo, lo + n)))
    s._evict(unit)
    assert dropped == [(PMD, 4 * PMD)]


def test_a_unit_compute_passed_is_dropped_once_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed unit compute reached before the read-ahead did was faulted in by compute: it is still dropped
    once compute has left it behind (or it would crowd the group until the kernel reclaims it)."""
    mib = 1 << 20
    units = _units([10 * mib] * 8)
    s = Streamer(units, stream_bytes=0, n_layer=7, lock=False)
    s._use(StreamSets((), tuple(units), 25 * mib))
    monkeypatch.setattr(s, "_read_ahead", lambda *_: None)
    dropped: list[int] = []
    monkeypatch.setattr(s, "_evict", lambda u: dropped.append(u.index))
    n = len(STEPS)
    s._pos = 2 * n  # compute is already at 2 when the prefetch thread follows 0
    s._follow(0)
    assert {0, n} <= set(s._fetched)
    s._follow(2 * n)
    assert dropped == [0, 1]


def test_a_streamed_layer_is_read_in_graph_order_and_dropped_step_by_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a Llama GGUF a layer's file order is FFN down, gate, up, attention; the graph computes attention first.
    Read-ahead follows the graph, and each step computed is dropped at once (its inner huge-page folios; the edges
    go with the layer), so the read-ahead room need only hold a step."""
    mib = 1 << 20
    f = Path("/m.gguf")
    parts = [("ffn_down", 10), ("ffn_gate", 10), ("ffn_up", 10), ("attn_q", 10)]  # MiB, in file order
    units, steps, at = [], {}, 0
    for layer in range(3):
        start = at
        for name, size in parts:
            steps.setdefault((layer, stream_step(f"blk.{layer}.{name}.weight")), []).append(
                Span(f, at, at + size * mib))
            at += size * mib
        units.append(Unit(layer, (Span(f, start, at),)))
    steps = {k: tuple(v) for k, v in steps.items()}
    s = Streamer(units, stream_bytes=0, n_layer=3, lock=False, steps=steps)
    s._use(StreamSets((units[0],), tuple(units[1:]), 20 * mib))
    n = len(STEPS)
    assert [p.pos for p in pieces_of(units[1], steps)] == [n, n + 1, n + 2, n + 3]
    assert b"ffn_gate-1" in s._markers and b"ffn_gate-0" not in s._markers  # steps of streamed layers only
    reads: list[int] = []
    inner: list[int] = []
    monkeypatch.setattr(s, "_read_ahead", lambda _f, lo, _size: reads.append(lo))
    monkeypatch.setattr(s, "_drop_inner", lambda piece: inner.append(piece.pos))
    monkeypatch.setattr(s, "_evict", lambda unit: inner.append(-unit.index))
    s._follow(0)  # layer 0 is resident: layer 1's attention (its last 10 MiB in the file), then its FFN gate
    layer1 = units[1].spans[0].start
    assert [(lo - layer1) // mib for lo in reads] == [30, 38, 10, 18]  # 8 MiB requests
    s._follow(n + 1)  # the gate computing: attention done, dropped; the layer stays
    assert inner == [n]
    s._follow(2 * n)  # layer 2 starts: the rest of layer 1 goes, the whole unit out to its edges
    assert inner == [n, -1]


def test_steps_split_a_layer_by_the_graphs_steps(model: Path) -> None:
    mf = read_gguf(model)
    steps = step_spans(mf.tensors)
    unit = units_of(mf.tensors, N_LAYERS)[2]
    pieces = pieces_of(unit, steps)
    assert [p.pos % len(STEPS) for p in pieces] == [0, 1, 2, 3] and {p.index for p in pieces} == {2}
    assert sum(p.nbytes for p in pieces) == unit.nbytes  # every byte of the layer in exactly one step
    down = next(t for t in mf.tensors if t.name == "blk.2.ffn_down.weight")
    assert pieces[3].spans == (Span(model, down.offset, down.offset + down.nbytes),)
    head = units_of(mf.tensors, N_LAYERS)[-1]
    assert [p.pos for p in pieces_of(head, steps)] == [N_LAYERS * len(STEPS)]  # the head: one step


def test_refresh_counts_only_the_reserve_no_batch_wrote() -> None:
    """The group's anonymous memory already holds what the largest batch wrote of the compute buffer: a refresh
    (a draft closed) must not subtract that part again."""
    units = _units([100] * 6)
    s = Streamer(units, stream_bytes=300, n_layer=5, lock=False, reserve=512 * 10, touched=lambda n: 10 * n)
    assert s.reserve_left() == 5120  # nothing decoded yet
    s.largest_batch = 13
    assert s.reserve_left() == 5120 - 130
    s.largest_batch = 512
    assert s.reserve_left() == 0
    assert Streamer(units, stream_bytes=300, n_layer=5, lock=False, reserve=77).reserve_left() == 77


def test_with_no_room_everything_streams(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A memory cgroup that leaves no room for weights: every unit streams (reading 4 MiB at a time beats leaving
    a whole-file sweep to the kernel's LRU, see BENCHMARKS.md), and the tokens stay the same."""
    total = sum(u.nbytes for u in units_of(read_gguf(model).tensors, N_LAYERS))
    monkeypatch.setattr(streaming, "measured_stream_bytes", lambda *_: total)
    settings = SamplingSettings(temperature=0.0, max_tokens=8)
    with load_engine(model, plan=cpu_plan(n_ctx=256)) as plain:
        want = plain.complete("Once upon a time", settings).text
    engine = load_engine(model, plan=cpu_plan(n_ctx=256, disk_stream_bytes=total // 2))
    try:
        s = engine.streamer
        assert s is not None and not s.sets.resident and s.sets.streamed_bytes == total and s._thread is not None
        got = engine.complete("Once upon a time", settings)
        assert got.text == want
        assert s.positions >= 8 * (N_LAYERS + 1)
        # the eval callback saw the prompt's batch: a refresh counts only the compute buffer no batch wrote yet
        assert s.largest_batch == got.stats.prompt_tokens
        assert 0 < s.reserve_left() < s.reserve
    finally:
        engine.close()


def test_measured_read_speed_calibrates_later_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The median token's read speed is kept for the plans of that filesystem, unless the run read another way."""
    from corral.offload.bandwidth import cached_bandwidth, record_stream_bandwidth

    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    record_stream_bandwidth(tmp_path, 0.0)  # a cache holding a cold-read figure and a useless streaming one
    assert "disk" not in cached_bandwidth(tmp_path)
    model = tmp_path / "m.gguf"
    units = [Unit(i, (Span(model, 100 * i, 100 * i + 100),)) for i in range(4)]
    s = Streamer(units, stream_bytes=100, n_layer=3, lock=False)
    s._speeds = [5e8, 4e8]
    s._calibrate()  # too few tokens measured: nothing recorded
    assert "disk" not in cached_bandwidth(tmp_path)
    s._speeds = [5e8, 4e8, 6e8, 1e9]
    s._calibrate()
    got = cached_bandwidth(tmp_path)
    assert got["disk"] == got["disk_streaming"] == 6e8  # the median token's speed
    monkeypatch.setattr(streaming, "HUGEPAGE", False)  # CORRAL_STREAM_HUGEPAGE=0: 128 KiB reads, not the default
    s._speeds = [1e8, 1e8, 1e8]
    s._calibrate()
    assert cached_bandwidth(tmp_path)["disk_streaming"] == 6e8
    for speed in (1e9, 2e9, 1.5e9, 9e9, 1.2e9):  # the median of the last five runs, so one odd run moves nothing
        record_stream_bandwidth(model, speed)
    assert cached_bandwidth(tmp_path)["disk_streaming"] == 1.5e9


def test_a_split_gguf_streams_across_its_shards(tmp_path: Path) -> None:
    """Each shard is its own llama.cpp mapping: units span several files and the tokens stay the plain run's."""
    from corral.convert.converter import convert_checkpoint
    from corral.convert.minimodel import MiniSpec, build_checkpoint

    n_layer = 4
    ckpt = build_checkpoint(tmp_path / "ckpt", MiniSpec(n_embd=128, n_layer=n_layer, n_head=4, n_head_kv=2, n_ff=256),
                            seed=3)
    layer_bytes = 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256)
    result = convert_checkpoint(ckpt, tmp_path / "split.gguf", outtype="f32", split_max_size=2 * layer_bytes, force=True)
    assert len(result.paths) >= 3
    first = result.paths[0]
    settings = SamplingSettings(temperature=0.0, max_tokens=16)
    with load_engine(first, plan=cpu_plan(n_ctx=256)) as plain:
        want = list((plain.complete("Once upon a time", settings), plain.last_completion_tokens)[1])
    units = units_of(read_gguf(first).tensors, n_layer)
    assert len({s.file for u in units for s in u.spans}) >= 2
    engine = load_engine(first, plan=cpu_plan(n_ctx=256, disk_stream_bytes=sum(u.nbytes for u in units) // 2))
    try:
        s = engine.streamer
        assert s is not None and set(s._llama) == {s_.file for u in s.units for s_ in u.spans}  # every shard mapped
        engine.complete("Once upon a time", settings)
        assert list(engine.last_completion_tokens) == want
        assert s.positions >= 16 * (n_layer + 1)
    finally:
        engine.close()
