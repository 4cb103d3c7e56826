"""llama.cpp RPC workers as planner devices: the values a probe returns, endpoint parsing, and how a worker's
devices join the solver's device list and the speed estimate.

A worker (`corral worker`, llama.cpp's ggml-rpc server) exposes one or more ggml devices over TCP. The runtime
probes each worker (corral.app.runtime.rpc.probe) and hands the planner `RpcWorker` values; this module never
touches the network.

What the planner assumes about a worker's device (the RPC protocol says nothing about what a device is):
- ggml's CPU device reports all of its RAM as free (ggml-cpu.cpp: "free" is total), a GPU reports less: a
  device with free == total is taken for a CPU. Its usable memory is its total less the margin left for the OS
  and the worker process, as for this machine's RAM; a GPU keeps the usual VRAM margin.
- Memory bandwidth: what `RpcDevice.bandwidth` says (`--rpc-memory-bandwidth`, a hardware file), else for a CPU
  this machine's measured RAM bandwidth and CPU rates (workers are usually machines like this one), else a
  typical GPU's.
- Layers are split over devices in llama.cpp's default order: the workers' devices first (in `--rpc` order),
  then the local GPUs, so the output layer (and the logits) stay local when there is a local GPU.
- Network, per generated token: every stretch of layers on a worker's device costs one round trip (the client
  waits for its output before the next stretch can start) plus its inputs (the activations, n_embd floats, and
  the attention mask, one value per cached token) and its output (n_embd floats, or n_vocab logits when the
  output layer is there) at the link's bandwidth. A prompt batch moves the same per token, and the round trips
  once per micro-batch.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from corral.convert.errors import InvalidFile, UsageError
from corral.convert.units import format_bytes, parse_rate, parse_size

from . import memory

# A link nobody measured (probe with measure_link=False, or a hardware file without one): gigabit Ethernet.
UNMEASURED_LINK_LATENCY_S = 2e-4
UNMEASURED_LINK_BANDWIDTH = 117e6
ACTIVATION_BYTES = 4  # the activations between layers and the logits are F32


@dataclass(frozen=True)
class RpcDevice:
    """One ggml device a worker exposes."""

    endpoint: str  # "HOST:PORT" as parse_endpoint normalises it
    index: int  # the device's index on its worker
    name: str  # the ggml device name in the client's registry after ggml_backend_rpc_add_server
    description: str
    free: int  # bytes
    total: int  # bytes
    bandwidth: float | None = None  # memory read bytes/s when known (the protocol does not tell)

    @property
    def is_cpu(self) -> bool:
        """ggml's CPU device reports its whole RAM as free; a GPU never does."""
        return self.free >= self.total


@dataclass(frozen=True)
class RpcLink:
    """The measured network link from this machine to one worker."""

    endpoint: str
    latency_s: float  # one round trip, seconds
    bandwidth: float  # bytes/s, host -> worker

    @property
    def round_trip_s(self) -> float:
        return self.latency_s if self.latency_s > 0 else UNMEASURED_LINK_LATENCY_S

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth if self.bandwidth > 0 else UNMEASURED_LINK_BANDWIDTH

    @property
    def measured(self) -> bool:
        return self.latency_s > 0 and self.bandwidth > 0


@dataclass(frozen=True)
class RpcWorker:
    endpoint: str
    devices: tuple[RpcDevice, ...]
    link: RpcLink


def parse_endpoint(text: str) -> str:
    """`HOST:PORT` (an IPv6 host in brackets) validated and normalised: surrounding blanks removed, a host name
    lower-cased. A malformed endpoint is a UsageError with a one-line message."""
    raw = text.strip()
    host, sep, port_text = raw.rpartition(":")
    if not sep or not host or not port_text:
        raise UsageError(f"RPC endpoint {text!r} is not HOST:PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"RPC endpoint {text!r}: the port must be a number from 1 to 65535")
    port = int(port_text)
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]:{port}"
        except ValueError:
            raise UsageError(f"RPC endpoint {text!r}: {host} is not an IPv6 address") from None
    if ":" in host:
        raise UsageError(f"RPC endpoint {text!r}: write an IPv6 host in brackets, as [::1]:{port}")
    labels = host.split(".")
    if any(not label or not all(c.isalnum() or c in "-_" for c in label) for label in labels):
        raise UsageError(f"RPC endpoint {text!r}: {host!r} is not a host name or address")
    return f"{host.lower()}:{port}"


def check_unique(endpoints: Iterable[str]) -> tuple[str, ...]:
    """Endpoints normalised, each once: the same worker given twice is a UsageError (it serves one client)."""
    out: list[str] = []
    for text in endpoints:
        endpoint = parse_endpoint(text)
        if endpoint in out:
            raise UsageError(f"RPC worker {endpoint} is given twice")
        out.append(endpoint)
    return tuple(out)


# ---------------------------------------------------------------- devices for the solver

@dataclass(frozen=True)
class RemoteSlot:
    """A worker's device as the solver fills it."""

    device: RpcDevice
    overhead: int  # kept free on the worker: the OS and the worker process (CPU) or the VRAM margin (GPU)
    bandwidth: float  # memory read, bytes/s

    @property
    def free(self) -> int:
        return self.device.free

    @property
    def label(self) -> str:
        kind = "CPU" if self.device.is_cpu else "GPU"
        return f"{kind} device {self.device.index} of worker {self.device.endpoint}"


def remote_slots(workers: Sequence[RpcWorker], ram_bandwidth: float, gpu_bandwidth: float) -> tuple[RemoteSlot, ...]:
    """Every device of every worker, in the order llama.cpp places layers on them."""
    slots = []
    for worker in workers:
        for dev in worker.devices:
            if dev.is_cpu:
                overhead = memory.ram_margin(dev.total) + memory.PROCESS_OVERHEAD
                guess = ram_bandwidth
            else:
                overhead = memory.gpu_margin(dev.total)
                guess = gpu_bandwidth
            slots.append(RemoteSlot(dev, overhead, dev.bandwidth or guess))
    return tuple(slots)


def shortfall(endpoint: str, name: str, free: int, need: int) -> str:
    """The one line saying a worker cannot take its share."""
    return f"worker {endpoint} ({name}) has {format_bytes(free)} free, its share needs {format_bytes(need)}"


def network_seconds(stretches: Sequence[tuple[RpcLink, bool]], n_embd: int, n_vocab: int, mask_bytes: int) -> float:
    """Seconds per generated token spent on the network: `stretches` are the runs of layers on workers' devices
    in compute order, each with its link and whether it holds the output layer (see module docstring)."""
    total = 0.0
    for link, has_output in stretches:
        sent = n_embd * ACTIVATION_BYTES + mask_bytes
        back = (n_vocab if has_output else n_embd) * ACTIVATION_BYTES
        total += link.round_trip_s + (sent + back) / link.bytes_per_s
    return total


def prompt_network_seconds(stretches: Sequence[tuple[RpcLink, bool]], n_embd: int, n_ubatch: int) -> float:
    """Seconds per prompt token on the network: activations both ways per token, round trips per micro-batch."""
    total = 0.0
    for link, _ in stretches:
        total += 2 * n_embd * ACTIVATION_BYTES / link.bytes_per_s + link.round_trip_s / max(1, n_ubatch)
    return total


# ---------------------------------------------------------------- what-if and hardware files

def with_memory_bandwidth(workers: Sequence[RpcWorker], rate: float) -> tuple[RpcWorker, ...]:
    """`--rpc-memory-bandwidth`: every worker device whose bandwidth is unknown reads at `rate` bytes/s."""
    if rate <= 0:
        raise UsageError("--rpc-memory-bandwidth must be positive")
    return tuple(replace(w, devices=tuple(d if d.bandwidth else replace(d, bandwidth=rate) for d in w.devices))
                 for w in workers)


def _bytes(value: Any, where: str) -> int:
    if isinstance(value, str):
        return parse_size(value)
    if isinstance(value, int) and value >= 0:
        return value
    raise InvalidFile(f"{where} must be a byte count or a size like 128GiB")


def _rate(value: Any, where: str) -> float:
    if isinstance(value, str):
        return parse_rate(value)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    raise InvalidFile(f"{where} must be bytes/s or a rate like 10GB/s")


def workers_from_json(data: Any) -> tuple[RpcWorker, ...]:
    """Workers described in a hardware file (`rpc_workers`): endpoint, devices (total, optional free,
    bandwidth, name) and optional link (latency_s, bandwidth); sizes and rates as numbers or text (128GiB,
    1.25GB/s). Device names default to llama.cpp's (RPC0, RPC1, ... in order)."""
    if not isinstance(data, (list, tuple)):
        raise InvalidFile("rpc_workers must be a list")
    workers: list[RpcWorker] = []
    n = 0
    for i, w in enumerate(data):
        if not isinstance(w, dict) or "endpoint" not in w or not w.get("devices"):
            raise InvalidFile(f"rpc_workers[{i}] needs an endpoint and devices")
        try:
            endpoint = parse_endpoint(str(w["endpoint"]))
        except UsageError as exc:
            raise InvalidFile(str(exc)) from None
        devices = []
        if not isinstance(w["devices"], (list, tuple)):
            raise InvalidFile(f"rpc_workers[{i}].devices must be a list")
        for j, d in enumerate(w["devices"]):
            where = f"rpc_workers[{i}].devices[{j}]"
            if not isinstance(d, dict) or "total" not in d:
                raise InvalidFile(f"{where} needs at least total")
            total = _bytes(d["total"], f"{where}.total")
            free = _bytes(d.get("free", total), f"{where}.free")
            bw = _rate(d["bandwidth"], f"{where}.bandwidth") if d.get("bandwidth") is not None else None
            devices.append(RpcDevice(endpoint, int(d.get("index", j)), str(d.get("name", f"RPC{n}")),
                                     str(d.get("description", endpoint)), free, total, bw))
            n += 1
        link = w.get("link") or {}
        if not isinstance(link, dict):
            raise InvalidFile(f"rpc_workers[{i}].link must be an object")
        latency = float(link.get("latency_s", 0.0))
        rate = _rate(link["bandwidth"], f"rpc_workers[{i}].link.bandwidth") if link.get("bandwidth") else 0.0
        workers.append(RpcWorker(endpoint, tuple(devices), RpcLink(endpoint, latency, rate)))
    check_unique(w.endpoint for w in workers)
    return tuple(workers)


__all__ = ["RemoteSlot", "RpcDevice", "RpcLink", "RpcWorker", "check_unique", "network_seconds", "parse_endpoint",
           "prompt_network_seconds", "remote_slots", "shortfall", "with_memory_bandwidth", "workers_from_json"]
