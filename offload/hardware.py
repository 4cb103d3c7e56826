"""What machine we plan for: GPUs (NVML), RAM and swap (psutil), CPU features, free disk, measured bandwidths."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from corral.convert.errors import InputNotFound, InvalidFile, UsageError
from corral.convert.units import GiB

from .bandwidth import (  # noqa: F401  (re-exported: the cache and measurements lived here)
    BANDWIDTH_CACHE_FILE,
    cache_dir,
    cached_bandwidth,
    measure_bandwidth,
    measure_disk_bandwidth,
    measure_ram_bandwidth,
    record_stream_bandwidth,
)
from .cpu_rates import CpuRates, rates_from_json
from .gpus import GPUSpec, find_gpu
from .memlimit import cgroup_memory_limit
from .rpc import RpcWorker, workers_from_json

# Used only when nothing better is known (no measurement cached, unknown card): conservative typical values.
DEFAULT_RAM_BANDWIDTH = 20e9  # dual-channel DDR4/DDR5 desktop, effective read
DEFAULT_DISK_BANDWIDTH = 1.0e9  # a mid-range NVMe drive under page-cache reads
DEFAULT_GPU_BANDWIDTH = 500e9


@dataclass(frozen=True)
class GPU:
    """One GPU as the planner sees it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    bandwidth: float = DEFAULT_GPU_BANDWIDTH
    bandwidth_known: bool = False


@dataclass(frozen=True)
class Hardware:
    """Everything the planner needs to know about a machine (frozen; what-if flags build modified copies)."""

    gpus: tuple[GPU, ...] = ()
    ram_total: int = 16 * GiB
    ram_available: int = 12 * GiB
    swap_total: int = 0
    swap_free: int = 0
    cpu_cores: int = 4
    cpu_threads: int = 8
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cpu_name: str = "unknown CPU"
    disk_free: int | None = None
    ram_bandwidth: float = DEFAULT_RAM_BANDWIDTH
    disk_bandwidth: float = DEFAULT_DISK_BANDWIDTH
    bandwidth_measured: bool = False
    source: str = "detected"
    broken_cpu_buffers: frozenset[str] = frozenset()  # CPU extra buffers (AMX, CPU_REPACK) that crashed a probe
    absent_cpu_buffers: frozenset[str] = frozenset()  # ... that this llama.cpp build does not create here
    cpu_rates: CpuRates | None = None  # llama.cpp's CPU decode rates (None: typical values)
    measure_cpu: bool = False  # detected with measuring on: plan_model may time the CPU kernels it needs
    ram_limit: str = "machine"  # what bounds ram_total: "machine", "cgroup v1 /path", "cgroup v2 /path", "--ram"
    rpc_workers: tuple[RpcWorker, ...] = ()  # llama.cpp RPC workers whose devices the plan may use (offload.rpc)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_flags"] = sorted(self.cpu_flags)
        data["broken_cpu_buffers"], data["absent_cpu_buffers"] = sorted(self.broken_cpu_buffers), sorted(
            self.absent_cpu_buffers)
        data["gpus"] = [asdict(g) for g in self.gpus]
        data["cpu_rates"] = self.cpu_rates.to_json() if self.cpu_rates else None
        return data


def hardware_from_json(data: dict[str, Any]) -> Hardware:
    """Build Hardware from a dict (as written by `to_json` or by hand); unknown keys are an error."""
    if not isinstance(data, dict):
        raise InvalidFile("hardware description must be a JSON object")
    known = set(Hardware.__dataclass_fields__)
    extra = set(data) - known
    if extra:
        raise InvalidFile(f"unknown hardware keys: {', '.join(sorted(extra))}")
    values = dict(data)
    gpus = []
    for i, g in enumerate(values.pop("gpus", []) or []):
        if not isinstance(g, dict) or "total_bytes" not in g:
            raise InvalidFile(f"gpus[{i}] needs at least total_bytes")
        g = {"index": i, "name": f"GPU{i}", **g}
        g.setdefault("free_bytes", g["total_bytes"])
        gpus.append(GPU(**{k: g[k] for k in g if k in GPU.__dataclass_fields__}))
    values["gpus"] = tuple(gpus)
    values["cpu_flags"] = frozenset(values.get("cpu_flags", ()))
    for key in ("broken_cpu_buffers", "absent_cpu_buffers"):  # CPU extra buffer verdicts (offload.cpu_probe)
        values[key] = frozenset(values.get(key, ()))
    if values.get("cpu_rates") is not None:
        values["cpu_rates"] = rates_from_json(values["cpu_rates"])
    values["rpc_workers"] = workers_from_json(values.get("rpc_workers") or [])
    values["measure_cpu"] = False  # a described machine is never timed
    try:
        return Hardware(**values)
    except TypeError as exc:
        raise InvalidFile(f"bad hardware description: {exc}") from None


def load_hardware_file(path: str | Path) -> Hardware:
    """Read a `--hardware FILE.json` description."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFound("no such hardware file", path=p)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidFile(f"not valid JSON: {exc}", path=p) from None
    try:
        return replace(hardware_from_json(data), source=f"file {p.name}")
    except InvalidFile as exc:
        raise InvalidFile(str(exc), path=p) from None


# ---------------------------------------------------------------- probing

def probe_gpus() -> tuple[GPU, ...]:
    """Every NVIDIA GPU via NVML (nvidia-ml-py); () when there is no driver or no GPU."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no library: simply no GPUs
        return ()
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(gpu_from_probe(i, name, int(mem.total), int(mem.free), _nvml_bandwidth(pynvml, handle)))
    except Exception:
        return tuple(gpus)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return tuple(gpus)


def _nvml_bandwidth(pynvml: Any, handle: Any) -> float | None:
    """Peak bandwidth from max memory clock × bus width (2 transfers per clock), when NVML reports both."""
    try:
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        if clock_mhz and bus_bits:
            return clock_mhz * 1e6 * 2 * bus_bits / 8
    except Exception:
        pass
    return None


def gpu_from_probe(index: int, name: str, total: int, free: int, nvml_bw: float | None = None) -> GPU:
    """A detected GPU, bandwidth from the known-card table first, NVML clocks second."""
    card = find_gpu(name)
    if card is not None:
        return GPU(index, name, total, free, card.bandwidth, True)
    if nvml_bw:
        return GPU(index, name, total, free, nvml_bw, True)
    return GPU(index, name, total, free)


def cpu_info() -> tuple[frozenset[str], str]:
    """CPU feature flags and model name from /proc/cpuinfo (empty on other systems)."""
    flags: frozenset[str] = frozenset()
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = frozenset(value.split())
                elif key == "model name" and name == "unknown CPU":
                    name = value.strip()
                if flags and name != "unknown CPU":
                    break
    except OSError:
        pass
    return flags, name


def detect_hardware(model_path: str | Path | None = None, *, measure: bool = True,
                    cache: Path | None = None) -> Hardware:
    """Probe this machine; bandwidths come from the cache, measured once (~1-2 s) when `measure`, which also
    lets plan_model time llama.cpp's CPU kernels for the weight types it needs (cpu_measure, cached)."""
    import psutil

    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    flags, name = cpu_info()
    threads = os.cpu_count() or 1
    cores = psutil.cpu_count(logical=False) or threads
    where = Path(model_path) if model_path else Path.cwd()
    disk_free = _disk_free(where)
    bw = measure_bandwidth(where, cache=cache) if measure else cached_bandwidth(where, cache=cache)
    total, available, limit = int(vm.total), int(vm.available), cgroup_memory_limit()
    return Hardware(
        gpus=probe_gpus(),
        ram_total=min(total, limit.limit) if limit else total,
        ram_available=min(available, limit.available) if limit else available,
        ram_limit=limit.source if limit and limit.limit < total else "machine",
        swap_total=int(sw.total),
        swap_free=int(sw.free),
        cpu_cores=int(cores),
        cpu_threads=int(threads),
        cpu_flags=flags,
        cpu_name=name,
        disk_free=disk_free,
        ram_bandwidth=bw.get("ram", DEFAULT_RAM_BANDWIDTH),
        disk_bandwidth=bw.get("disk", DEFAULT_DISK_BANDWIDTH),
        bandwidth_measured="ram" in bw,
        source="detected",
        measure_cpu=measure,
    )


def _disk_free(path: Path) -> int | None:
    import shutil

    p = path if path.is_dir() else path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


# ---------------------------------------------------------------- what-if

def what_if(base: Hardware, *, gpus: list[GPUSpec] | None = None, ram: int | None = None,
            disk_read: float | None = None, cpu_only: bool = False, ram_bandwidth: float | None = None) -> Hardware:
    """Replace parts of a detected (or file) hardware description, as the what-if flags ask."""
    hw = base
    changed = False
    if cpu_only and gpus:
        raise UsageError("--cpu-only and --gpu contradict each other")
    if cpu_only:
        hw, changed = replace(hw, gpus=()), True
    if gpus:
        hw = replace(hw, gpus=tuple(
            GPU(i, g.name, g.memory_bytes, g.memory_bytes,
                g.bandwidth if g.bandwidth else DEFAULT_GPU_BANDWIDTH, g.bandwidth is not None)
            for i, g in enumerate(gpus)))
        changed = True
    if ram is not None:
        if ram <= 0:
            raise UsageError("--ram must be positive")
        # what the OS and desktop keep for themselves: ~8% (at least 1 GiB)
        hw = replace(hw, ram_total=ram, ram_available=max(ram - max(GiB, ram // 12), ram // 2), ram_limit="--ram")
        changed = True
    if disk_read is not None:
        hw = replace(hw, disk_bandwidth=disk_read)
        changed = True
    if ram_bandwidth is not None:
        hw = replace(hw, ram_bandwidth=ram_bandwidth)
        changed = True
    if changed and hw.source == "detected":
        hw = replace(hw, source="what-if")
    return hw


__all__ = ["GPU", "Hardware", "cached_bandwidth", "detect_hardware", "hardware_from_json",
           "load_hardware_file", "measure_bandwidth", "probe_gpus", "what_if"]
