"""F3: the offload plan's split (each GPU / RAM / disk) next to live usage (process RSS, VRAM via NVML)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from corral.convert.units import format_bytes
from corral.offload.plan import DevicePlan, Plan


@dataclass(frozen=True)
class GpuUsage:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    process_bytes: int | None = None


@dataclass(frozen=True)
class LiveUsage:
    rss_bytes: int
    gpus: tuple[GpuUsage, ...] = ()
    nvml: bool = False
    disk_read_per_token: int | None = None  # the streamed tier, measured over the last token
    disk_read_speed: float | None = None  # bytes/s


_nvml_state: dict[str, Any] = {}


def _nvml() -> Any | None:
    """The pynvml module once initialised, or None when there is no NVIDIA driver."""
    if "module" not in _nvml_state:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_state["module"] = pynvml
        except Exception:  # no library, no driver, no GPU: all mean "no NVML"
            _nvml_state["module"] = None
    return _nvml_state["module"]


def probe_live_usage() -> LiveUsage:
    """This process's RSS and, when NVML works, each GPU's used memory (and this process's share)."""
    from dataclasses import replace

    from corral.app.runtime.streaming import live_stats

    proc = psutil.Process()
    stream = live_stats()
    streamed = {"disk_read_per_token": stream.read_per_token, "disk_read_speed": stream.read_speed} if (
        stream is not None and stream.read_per_token) else {}
    return replace(_probe(proc), **streamed)


def _probe(proc: psutil.Process) -> LiveUsage:
    rss = proc.memory_info().rss
    nv = _nvml()
    if nv is None:
        return LiveUsage(rss)
    gpus = []
    try:
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            info = nv.nvmlDeviceGetMemoryInfo(handle)
            name = nv.nvmlDeviceGetName(handle)
            mine = None
            try:
                for p in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid == proc.pid and p.usedGpuMemory is not None:
                        mine = int(p.usedGpuMemory)
            except Exception:
                mine = None
            gpus.append(GpuUsage(index, name if isinstance(name, str) else name.decode(), info.used, info.total, mine))
    except Exception:
        return LiveUsage(rss, tuple(gpus), nvml=bool(gpus))
    return LiveUsage(rss, tuple(gpus), nvml=True)


def device_kind(device: DevicePlan) -> tuple[str, int | None]:
    """('gpu', index) | ('rpc', index) | ('ram', None) | ('disk', None) from a plan device's `kind` or its name."""
    kind = device.kind.lower()
    name = device.name.lower()
    digits = re.search(r"(\d+)", name)
    index = int(digits.group(1)) if digits else None
    if kind == "rpc":  # a device of an RPC worker (another machine)
        return "rpc", index
    if kind in ("gpu", "cuda") or name.startswith(("cuda", "gpu", "vulkan", "metal")):
        return "gpu", index
    if kind == "disk" or (not kind and ("disk" in name or "mmap" in name)):
        return "disk", None
    return "ram", None  # kind "cpu": system RAM


def streams_from_disk(plan: Plan) -> bool:
    """True when the plan leaves weights on disk (mmap reads them again on every token)."""
    if plan.disk_stream_bytes:
        return True
    for device in plan.devices:
        if device_kind(device)[0] == "disk" and device.weights_bytes > 0:
            return True
    return any("disk" in w.lower() for w in plan.warnings)


def _b(n: int | None) -> str:
    return "—" if n is None else format_bytes(n)


def render_memory(plan: Plan | None, live: LiveUsage) -> Group:
    """The plan table with a live column, warnings, and GPUs NVML sees that the plan does not use."""
    parts: list[Any] = []
    if plan is None:
        parts.append(Text("No offload plan from the engine; live usage only.", style="dim"))
    else:
        if plan.headline:
            parts.append(Text(plan.headline, style="bold"))
        tps = plan.tokens_per_second
        if tps:
            line = f"planned speed ≈ {tps:.2f} tok/s"
            if plan.disk_stream_bytes:
                line += f"; {_b(plan.disk_stream_bytes)} read from disk per token"
            parts.append(Text(line, style="dim"))
    table = Table(box=None, padding=(0, 1), header_style="bold")
    for column in ("Device", "Weights", "KV cache", "Compute+", "Planned", "Capacity"):
        table.add_column(column, justify="left" if column == "Device" else "right", no_wrap=True)
    table.add_column("Live now", justify="left", ratio=1)
    gpus = {g.index: g for g in live.gpus}
    seen_gpus: set[int] = set()
    for device in plan.devices if plan is not None else ():
        kind, index = device_kind(device)
        if kind == "gpu":
            gpu = gpus.get(index if index is not None else -1)
            if gpu is not None:
                seen_gpus.add(gpu.index)
                mine = f"; ours {_b(gpu.process_bytes)}" if gpu.process_bytes is not None else ""
                now = f"{_b(gpu.used_bytes)} VRAM used{mine}"
            else:
                now = "VRAM: no NVML"
        elif kind == "rpc":
            now = f"on worker {device.endpoint}"
        elif kind == "ram":
            now = f"{_b(live.rss_bytes)} RSS"
        else:
            now = "read via mmap" if device.weights_bytes else "—"
            if live.disk_read_per_token is not None:
                speed = f" at {live.disk_read_speed / 1e9:.2f} GB/s" if live.disk_read_speed else ""
                now = f"{_b(live.disk_read_per_token)} read per token{speed} (streamed ahead of compute)"
        table.add_row(
            Text(device.name),
            _b(device.weights_bytes),
            _b(device.kv_bytes),
            _b(device.compute_bytes + device.overhead_bytes),
            _b(device.total_bytes),
            _b(device.capacity_bytes),
            now,
        )
    for device in plan.draft.devices if plan is not None and plan.draft is not None else ():
        table.add_row(Text(f"draft {device.name}", style="cyan"), _b(device.weights_bytes), _b(device.kv_bytes),
                      _b(device.compute_bytes + device.overhead_bytes), _b(device.total_bytes), "",
                      f"{plan.draft.model} (speculative decoding)")
    if plan is None:
        table.add_row("process", "", "", "", "", "", f"{_b(live.rss_bytes)} RSS")
    for gpu in live.gpus:
        if gpu.index not in seen_gpus:
            table.add_row(f"GPU{gpu.index} (not in plan)", "", "", "", "", _b(gpu.total_bytes),
                          f"{_b(gpu.used_bytes)} VRAM used")
    parts.append(table)
    parts.append(Text("Compute+ = compute buffers plus context/output overhead; Planned = the plan's total.",
                      style="dim"))
    if not live.nvml:
        parts.append(Text("NVML not available: VRAM is not measured.", style="dim"))
    if plan is not None and streams_from_disk(plan):
        parts.append(Text("⚠ weights stream from disk on every token: expect disk-bound speed "
                          "(more RAM or a smaller quant fixes it)", style="bold yellow"))
    for warning in plan.warnings if plan is not None else ():
        parts.append(Text(f"⚠ {warning}", style="yellow"))
    return Group(*parts)


class MemoryScreen(ModalScreen[None]):
    """Refreshes the live column every `interval` seconds; escape closes, r refreshes now."""

    BINDINGS = [
        Binding("escape,q,f3", "close", "Close"),
        Binding("r", "refresh_now", "Refresh"),
    ]

    def __init__(self, plan: Plan | None, probe: Callable[[], LiveUsage] = probe_live_usage,
                 interval: float = 1.0) -> None:
        super().__init__()
        self.plan = plan
        self.probe = probe
        self.interval = interval

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="memory-box"):
            yield Static("Memory: plan vs. live", id="memory-title")
            yield Static(id="memory-table")
            yield Static("escape closes · r refreshes (live values update every second)", classes="hint")

    def on_mount(self) -> None:
        self.action_refresh_now()
        if self.interval > 0:
            self.set_interval(self.interval, self.action_refresh_now)

    def action_refresh_now(self) -> None:
        self.query_one("#memory-table", Static).update(render_memory(self.plan, self.probe()))

    def action_close(self) -> None:
        self.dismiss(None)
