"""Hardware probe, what-if parsing and the bandwidth cache (NVML faked: no GPU needed)."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from corral.convert.errors import InvalidFile, UsageError
from corral.convert.units import GiB, parse_rate, parse_size
from corral.offload import bandwidth, hardware
from corral.offload.gpus import find_gpu, parse_gpu_spec
from corral.offload.hardware import GPU, Hardware, hardware_from_json, load_hardware_file, what_if


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * GiB), ("24G", 24 * GiB), ("24GB", 24 * 10**9), ("512MiB", 512 * 1024**2), ("1.5TiB", int(1.5 * 1024**4)),
    ("1000", 1000),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "24 apples", "-3GiB"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_size(bad)


def test_parse_rate() -> None:
    assert parse_rate("3GB/s") == 3e9
    assert parse_rate("1008GB/s") == 1008e9
    assert parse_rate("500MB/s") == 500e6
    with pytest.raises(UsageError):
        parse_rate("fast")


def test_gpu_spec_forms() -> None:
    assert parse_gpu_spec("24GiB").memory_bytes == 24 * GiB and parse_gpu_spec("24GiB").bandwidth is None
    s = parse_gpu_spec("24GiB@1008GB/s")
    assert (s.memory_bytes, s.bandwidth) == (24 * GiB, 1008e9)
    assert parse_gpu_spec("rtx4090").bandwidth == 1008e9
    assert parse_gpu_spec("a100-80g").memory_bytes == 80 * GiB
    assert parse_gpu_spec("h100").bandwidth == 3350e9
    with pytest.raises(UsageError, match="unknown GPU"):
        parse_gpu_spec("voodoo5")


def test_nvml_names_match_known_cards() -> None:
    assert find_gpu("NVIDIA GeForce RTX 3090 Ti").key == "rtx3090ti"
    assert find_gpu("NVIDIA GeForce RTX 3090").key == "rtx3090"
    assert find_gpu("NVIDIA A100-SXM4-80GB").key == "a100-80g"
    assert find_gpu("Matrox G200") is None


def _fake_pynvml(gpus: list[tuple[str, int, int]]) -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    mod.NVML_CLOCK_MEM = 2
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: len(gpus)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: gpus[h][0].encode()
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=gpus[h][1], free=gpus[h][2])
    mod.nvmlDeviceGetMaxClockInfo = lambda h, kind: 10501
    mod.nvmlDeviceGetMemoryBusWidth = lambda h: 384
    return mod


def test_probe_gpus_with_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml([("NVIDIA GeForce RTX 4090", 24 * GiB, 23 * GiB), ("Mystery Card", 16 * GiB, 15 * GiB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = hardware.probe_gpus()
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].bandwidth == 1008e9 and gpus[0].free_bytes == 23 * GiB
    # unknown card: bandwidth from NVML's memory clock x bus width (2 transfers per clock)
    assert gpus[1].bandwidth == pytest.approx(10501e6 * 2 * 384 / 8)


def test_probe_gpus_without_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml([])

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert hardware.probe_gpus() == ()


def test_detect_hardware_uses_cache_and_is_sane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(bandwidth, "measure_ram_bandwidth", lambda: calls.append("ram") or 12e9)
    monkeypatch.setattr(bandwidth, "measure_disk_bandwidth", lambda p: calls.append("disk") or 2e9)
    monkeypatch.setattr(hardware, "probe_gpus", lambda: ())
    hw = hardware.detect_hardware(tmp_path, cache=tmp_path / "c")
    assert hw.ram_bandwidth == 12e9 and hw.disk_bandwidth == 2e9 and hw.bandwidth_measured
    assert 0 < hw.ram_available <= hw.ram_total and hw.cpu_threads >= hw.cpu_cores >= 1
    hardware.detect_hardware(tmp_path, cache=tmp_path / "c")
    assert calls == ["ram", "disk"]  # second detection: from the JSON cache
    assert json.loads((tmp_path / "c" / "bandwidth-v2.json").read_text())["ram"] == 12e9


def test_real_bandwidth_measurement(tmp_path: Path) -> None:
    """Real RAM and disk measurements (their time budgets are checked in bench/bench_latency.py)."""
    bw = hardware.measure_bandwidth(tmp_path, cache=tmp_path / "cache")
    assert bw["ram"] > 1e8 and bw["disk"] > 1e6
    assert json.loads((tmp_path / "cache" / "bandwidth-v2.json").read_text())["ram"] == bw["ram"]
    assert not list(tmp_path.glob(".corral-bw-*"))  # scratch file removed


def test_cold_read_reads_as_streaming_does_and_falls_back_to_plain_reads(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk tier's speed is measured by populating a MADV_HUGEPAGE mapping (the streaming engine's 4 MiB
    requests); a kernel without MADV_POPULATE_READ gets plain reads. Neither leaves the file cached."""
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(24 * 1024 * 1024 + 123))  # not a whole number of pages or chunks
    used: list[str] = []
    populate, read = bandwidth._populate, bandwidth._read
    monkeypatch.setattr(bandwidth, "_populate", lambda *a: used.append("populate") or populate(*a))
    monkeypatch.setattr(bandwidth, "_read", lambda *a: used.append("read") or read(*a))
    assert (bandwidth.timed_cold_read(f, 1 << 40, 10.0) or 0) > 1e6
    assert used == ["populate"]

    def refused(*_a: object) -> tuple[int, float]:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(bandwidth, "_populate", refused)
    assert (bandwidth.timed_cold_read(f, 1 << 40, 10.0) or 0) > 1e6
    assert used == ["populate", "read"]


def test_what_if_replaces_parts() -> None:
    base = Hardware(gpus=(GPU(0, "x", 8 * GiB, 8 * GiB),), ram_total=16 * GiB, ram_available=12 * GiB)
    hw = what_if(base, gpus=[parse_gpu_spec("rtx4090"), parse_gpu_spec("12GiB")], ram=128 * GiB, disk_read=3e9)
    assert [g.total_bytes for g in hw.gpus] == [24 * GiB, 12 * GiB]
    assert hw.ram_total == 128 * GiB and 110 * GiB < hw.ram_available < 128 * GiB
    assert hw.disk_bandwidth == 3e9 and hw.source == "what-if"
    assert what_if(base, cpu_only=True).gpus == ()
    with pytest.raises(UsageError):
        what_if(base, cpu_only=True, gpus=[parse_gpu_spec("24GiB")])


def test_hardware_file_round_trip(tmp_path: Path) -> None:
    hw = Hardware(gpus=(GPU(0, "A", 24 * GiB, 20 * GiB, 1e12, True),), cpu_flags=frozenset({"avx2"}))
    f = tmp_path / "hw.json"
    f.write_text(json.dumps(hw.to_json()))
    back = load_hardware_file(f)
    assert back.gpus == hw.gpus and back.cpu_flags == hw.cpu_flags and back.source == "file hw.json"
    assert hardware_from_json({"gpus": [{"total_bytes": 8 * GiB}]}).gpus[0].free_bytes == 8 * GiB
    with pytest.raises(InvalidFile, match="unknown hardware keys"):
        hardware_from_json({"ram": 1})
    f.write_text("{not json")
    with pytest.raises(InvalidFile):
        load_hardware_file(f)


def test_cpu_buffer_verdicts_survive_a_hardware_file(tmp_path: Path) -> None:
    """A --hardware file can say which CPU extra buffers crash (or are absent) on the machine it describes."""
    hw = Hardware(cpu_flags=frozenset({"avx2", "avx512f", "avx512_vnni", "amx_int8"}),
                  broken_cpu_buffers=frozenset({"AMX"}), absent_cpu_buffers=frozenset({"CPU_REPACK"}))
    f = tmp_path / "hw.json"
    f.write_text(json.dumps(hw.to_json()))
    back = load_hardware_file(f)
    assert back.broken_cpu_buffers == {"AMX"} and back.absent_cpu_buffers == {"CPU_REPACK"}
    assert hardware_from_json({}).broken_cpu_buffers == frozenset()

