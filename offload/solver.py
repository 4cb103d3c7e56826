"""Placement: whole layers to RPC workers' devices and GPUs (balanced by free memory), then attention + KV of
further layers with their FFN in RAM (tensor overrides; without workers), the rest in RAM behind mmap, and
whatever RAM cannot hold streamed from disk."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from corral.convert.units import format_bytes as human

from . import memory, rpc
from .hardware import DEFAULT_GPU_BANDWIDTH, Hardware
from .plan import DevicePlan
from .profile import ModelProfile, TensorInfo

# Copies of CPU-resident weights that the CUDA backend makes to run big prompt batches on the GPU
# (ggml_backend_sched op offload, batches >= 32 tokens): the largest weights of a CPU layer, in the GPU's
# compute buffer. An estimate, not yet checked on a GPU.
OP_OFFLOAD_COPIES = 2


@dataclass(frozen=True)
class Settings:
    """Options resolved for one solve: padded context, batch sizes, KV type, attention kernel."""

    n_ctx: int
    kv_type: str = "f16"
    n_batch: int = 2048
    n_ubatch: int = 512
    flash_attn: bool = True
    n_gpu_layers: int | None = None
    repack: bool = True


class Costs:
    """Per-layer byte counts of a profile, computed once and reused across many solves."""

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile
        n = profile.n_layer
        self.attn = [0] * n
        self.ffn = [0] * n
        for i, layer in enumerate(profile.by_layer):
            for t in layer:
                if t.kind == "ffn":
                    self.ffn[i] += t.nbytes
                else:
                    self.attn[i] += t.nbytes
        g = {t.kind: t for t in profile.globals}
        self.embd = g["embd"].nbytes if "embd" in g else 0
        out = g.get("output") or g.get("embd")  # tied: llama.cpp loads token_embd again as the output
        self.output = (out.nbytes if out else 0) + (g["output_norm"].nbytes if "output_norm" in g else 0)
        self.rope = g["rope"].nbytes if "rope" in g else 0
        self.max_ffn_tensor = max((t.nbytes for layer in profile.by_layer for t in layer if t.kind == "ffn"),
                                  default=0)

    @cached_property
    def n_positions(self) -> int:
        return self.profile.n_layer + 1


@dataclass(frozen=True)
class Placement:
    """Where everything went for one (profile, hardware, settings)."""

    settings: Settings
    n_full: int  # llama.cpp positions fully on GPU, counting the output layer as one
    n_attn_only: int
    gpu_counts: tuple[int, ...]  # positions per device: workers' devices, then GPUs (tensor_split)
    attn_only_layers: tuple[int, ...]
    output_on_gpu: bool
    repack: bool
    devices: tuple[DevicePlan, ...]
    cpu_weights_read: int  # CPU-resident weights read per token (token_embd excluded: one row per token)
    gpu_weights_read: tuple[int, ...]  # per device, in gpu_counts' order
    disk_stream_bytes: int
    swap_bytes: int
    kv_layer_bytes: int
    fits: bool
    why: str
    extra_bufts_off: tuple[str, ...] = ()  # extra buffers this plan would use that the probe found broken

    @property
    def n_gpu_layers(self) -> int:
        return self.n_full + self.n_attn_only


def _partition(costs: list[int], budgets: list[int]) -> list[int] | None:
    """Contiguous split of `costs` over GPUs in order, proportional to budgets when possible; None if no fit."""
    n, total = len(costs), sum(costs)
    caps = [max(0, b) for b in budgets]
    if total > sum(caps):
        return None
    if n == 0:
        return [0] * len(budgets)
    whole = sum(caps)
    counts, idx, done, target = [], 0, 0, 0.0
    for g, cap in enumerate(caps):
        target += total * cap / whole if whole else 0
        acc = 0
        start = idx
        last = g == len(caps) - 1
        while idx < n and acc + costs[idx] <= cap and (last or done + costs[idx] / 2 <= target):
            acc += costs[idx]
            done += costs[idx]
            idx += 1
        counts.append(idx - start)
    if idx == n:
        return counts
    counts, idx = [], 0  # proportional split failed on rounding: fill each GPU in turn
    for cap in caps:
        acc, start = 0, idx
        while idx < n and acc + costs[idx] <= cap:
            acc += costs[idx]
            idx += 1
        counts.append(idx - start)
    return counts if idx == n else None


def _items(c: Costs, k: int, m: int, kv_layer: int, out_delta: int) -> tuple[list[int], list[int]]:
    """Costs of the GPU positions in llama.cpp order (attention-only layers, whole layers, output) and
    the layer index of each (-1 for the output)."""
    n = c.profile.n_layer
    first = n - max(k - 1, 0) - m
    costs, layers = [], []
    for j in range(m):
        i = first + j
        costs.append(c.attn[i] + kv_layer)
        layers.append(i)
    for i in range(first + m, n):
        costs.append(c.attn[i] + c.ffn[i] + kv_layer)
        layers.append(i)
    if k >= 1:
        costs.append(c.output + out_delta)
        layers.append(-1)
    return costs, layers


def solve(profile: ModelProfile, hw: Hardware, s: Settings, costs: Costs | None = None) -> Placement:
    """Place every tensor for one context size; see module docstring for the order of preference."""
    c = costs or Costs(profile)
    n = profile.n_layer
    kv_layer = memory.kv_bytes_per_layer(profile, s.n_ctx, s.kv_type)
    comp_layers = memory.compute_buffer_bytes(profile, s.n_ctx, s.n_ubatch, s.flash_attn, output=False)
    comp_full = memory.compute_buffer_bytes(profile, s.n_ctx, s.n_ubatch, s.flash_attn)
    out_delta = comp_full - comp_layers
    gpus = hw.gpus
    remote = remote_slots(hw)  # llama.cpp's order: the workers' devices first, then the local GPUs
    overheads = [r.overhead for r in remote] + [memory.CUDA_OVERHEAD + memory.gpu_margin(g.total_bytes)
                                                for g in gpus]
    frees = [r.free for r in remote] + [g.free_bytes for g in gpus]
    base_budgets = [f - o - comp_layers - c.rope for f, o in zip(frees, overheads)]

    def budgets(k: int) -> list[int]:
        b = list(base_budgets)
        if gpus and k < c.n_positions:  # op offload runs on the first local GPU (an RPC device has none)
            b[len(remote)] -= OP_OFFLOAD_COPIES * c.max_ffn_tensor
        return b

    def feasible(k: int, m: int) -> list[int] | None:
        return _partition(_items(c, k, m, kv_layer, out_delta)[0], budgets(k))

    k = m = 0
    counts: list[int] = [0] * len(frees)
    if frees and s.n_gpu_layers != 0:
        if s.n_gpu_layers is not None:
            k = min(max(s.n_gpu_layers, 0), c.n_positions)
            found = feasible(k, 0)
            counts = found if found is not None else _proportional_counts(k, base_budgets)
        else:
            lo, hi = 0, c.n_positions  # largest k with a fit (monotone)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if feasible(mid, 0) is not None:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
            # attention-only layers would cross the network twice per layer: not with workers
            lo, hi = 0, (n - max(k - 1, 0)) if k >= 1 and not remote else 0
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if feasible(k, mid) is not None:
                    lo = mid
                else:
                    hi = mid - 1
            m = lo
            counts = feasible(k, m) or [0] * len(frees)
    return _account(profile, hw, s, c, k, m, counts, kv_layer, comp_layers, comp_full, overheads, remote)


def remote_slots(hw: Hardware) -> tuple[rpc.RemoteSlot, ...]:
    """The RPC workers' devices the solver fills before the local GPUs."""
    return rpc.remote_slots(hw.rpc_workers, hw.ram_bandwidth, DEFAULT_GPU_BANDWIDTH)


def _proportional_counts(k: int, budgets: list[int]) -> list[int]:
    caps = [max(1, b) for b in budgets]
    whole = sum(caps)
    counts = [k * b // whole for b in caps]
    counts[-1] += k - sum(counts)
    return counts


def _account(profile: ModelProfile, hw: Hardware, s: Settings, c: Costs, k: int, m: int, counts: list[int],
             kv_layer: int, comp_layers: int, comp_full: int, overheads: list[int],
             remote: tuple[rpc.RemoteSlot, ...] = ()) -> Placement:
    n = profile.n_layer
    item_costs, item_layers = _items(c, k, m, kv_layer, 0)
    attn_only = tuple(item_layers[:m])
    layer_gpu: dict[int, int] = {}
    pos = 0
    for g, cnt in enumerate(counts):
        for _ in range(cnt):
            if pos < len(item_layers):
                layer_gpu[item_layers[pos]] = g
            pos += 1
    output_on_gpu = -1 in layer_gpu
    n_dev = len(remote) + len(hw.gpus)
    gpu_w = [0] * n_dev
    gpu_kv = [0] * n_dev
    gpu_layers = [0] * n_dev
    gpu_attn = [0] * n_dev
    cpu_tensors: list[TensorInfo] = []
    cpu_kv = 0
    cpu_layers = 0
    attn_set = set(attn_only)
    for t in profile.tensors:
        li = t.layer
        if li is None:
            if t.kind in ("output", "output_norm") and output_on_gpu:
                gpu_w[layer_gpu[-1]] += t.nbytes
            else:
                cpu_tensors.append(t)
            continue
        g = layer_gpu.get(li)
        if g is None or (li in attn_set and t.kind == "ffn"):
            cpu_tensors.append(t)
        else:
            gpu_w[g] += t.nbytes
    if output_on_gpu and profile.tie_embeddings:
        gpu_w[layer_gpu[-1]] += c.output - sum(t.nbytes for t in profile.globals if t.kind == "output_norm")
    for i in range(n):
        g = layer_gpu.get(i)
        if g is None:
            cpu_kv += kv_layer
            cpu_layers += 1
        else:
            gpu_kv[g] += kv_layer
            if i in attn_set:
                gpu_attn[g] += 1
            else:
                gpu_layers[g] += 1
    hosts = [gpu_layers[g] + gpu_attn[g] > 0 or (output_on_gpu and layer_gpu[-1] == g) for g in range(n_dev)]
    has_gpu = bool(hw.gpus)  # local GPUs: their host buffer and op offload change the CPU's buffers
    partial = has_gpu and (cpu_layers > 0 or not output_on_gpu or bool(attn_only))
    devices: list[DevicePlan] = []
    gpu_read: list[int] = []
    for g in range(n_dev):
        comp = 0
        if hosts[g]:
            comp = comp_layers + (comp_full - comp_layers if output_on_gpu and layer_gpu[-1] == g else 0)
            if g == len(remote) and partial:
                comp += OP_OFFLOAD_COPIES * c.max_ffn_tensor
        w = gpu_w[g] + (c.rope if hosts[g] else 0)
        if g < len(remote):
            r = remote[g]
            over = overheads[g] if hosts[g] else 0  # a worker's device that takes nothing allocates nothing
            devices.append(DevicePlan(r.device.name, "rpc", r.label, w, gpu_kv[g], comp, over, r.free,
                                      r.bandwidth, gpu_layers[g], gpu_attn[g], endpoint=r.device.endpoint))
        else:
            gpu = hw.gpus[g - len(remote)]
            devices.append(DevicePlan(f"GPU{g - len(remote)}", "gpu", gpu.name, w, gpu_kv[g], comp, overheads[g],
                                      gpu.free_bytes, gpu.bandwidth, gpu_layers[g], gpu_attn[g]))
        gpu_read.append(w)

    # CPU: extra-buffer copies (CPU_REPACK, AMX) and everything else anonymous must be resident; mapped weights
    # may stream. An extra buffer the probe found broken on this machine turns them all off (one switch).
    dups = [memory.tied_output(t) for t in cpu_tensors if t.kind == "embd"] if (
        profile.tie_embeddings and not output_on_gpu) else []
    absent = hw.absent_cpu_buffers
    off = tuple(sorted(set(hw.broken_cpu_buffers) & memory.extra_buffers_used([*cpu_tensors, *dups],
                                                                                hw.cpu_flags, has_gpu, absent)))
    repack_allowed = s.repack and not has_gpu and not off
    bufs = memory.cpu_buffers(cpu_tensors, hw.cpu_flags if repack_allowed else (), has_gpu, dups, absent)
    extra = bufs["CPU_REPACK"] + bufs["AMX"]
    if cpu_layers:
        cpu_comp = memory.compute_buffer_bytes(profile, s.n_ctx, s.n_ubatch, s.flash_attn, output=not output_on_gpu)
    elif not output_on_gpu:
        cpu_comp = memory.compute_buffer_bytes(profile, s.n_ctx, s.n_ubatch, s.flash_attn, layers=False)
    else:
        cpu_comp = memory.host_compute_bytes(profile, s.n_ubatch)
    out_buf = memory.output_buffer_bytes(profile)
    # inside a memory cgroup the limit is this group's alone: no room to leave for the rest of the machine
    margin = hw.ram_total // 32 if hw.ram_limit.startswith("cgroup") else memory.ram_margin(hw.ram_total)
    cpu_over = memory.PROCESS_OVERHEAD + out_buf + margin
    anon = extra + cpu_kv + cpu_comp + cpu_over
    mapped = bufs["mapped_used"]
    room = hw.ram_available - anon
    swap = max(0, -room)
    resident = max(0, min(mapped, room))
    embd_cpu = c.embd if any(t.kind == "embd" for t in cpu_tensors) else 0
    streamed = max(0, mapped - embd_cpu - max(0, room))  # a token reads one row of the embedding: it may page
    if streamed and hw.ram_limit.startswith("cgroup") and (cpu_layers or not output_on_gpu):
        streamed = memory.cgroup_streamed_bytes(profile, mapped - embd_cpu, hw.ram_available, extra + cpu_kv + out_buf,
                                                s.n_ctx, s.n_ubatch, s.flash_attn)
    devices.append(DevicePlan("CPU", "cpu", hw.cpu_name, resident + extra, cpu_kv, cpu_comp, cpu_over,
                              hw.ram_available, hw.ram_bandwidth, cpu_layers, 0, bufs["CPU_REPACK"], out_buf,
                              bufs["CPU_Mapped"], bufs["AMX"]))
    if streamed:
        devices.append(DevicePlan("disk", "disk", "streamed ahead of compute, every token", streamed, 0, 0, 0,
                                  profile.file_bytes, hw.disk_bandwidth))
    cpu_read = max(0, mapped - embd_cpu - streamed) + extra

    why = ""
    for d in devices:
        if d.kind == "rpc" and not d.fits:
            why = rpc.shortfall(d.endpoint, d.name, d.capacity_bytes, d.total_bytes)
            break
        if d.kind == "gpu" and not d.fits:
            why = (f"{d.name} needs {human(d.total_bytes)} but has {human(d.capacity_bytes)} free "
                   f"(n_gpu_layers={k + m})")
            break
    if not why and swap > hw.swap_free:
        why = (f"RAM: KV cache, compute buffers{' and repacked weights' if extra else ''} need "
               f"{human(anon)} but {human(hw.ram_available)} is available (+{human(hw.swap_free)} swap)")
    return Placement(
        settings=replace(s, repack=False) if off else s, n_full=k, n_attn_only=m, gpu_counts=tuple(counts), attn_only_layers=attn_only,
        output_on_gpu=output_on_gpu, repack=repack_allowed and extra > 0, devices=tuple(devices),
        cpu_weights_read=cpu_read, gpu_weights_read=tuple(gpu_read), disk_stream_bytes=streamed, swap_bytes=swap,
        kv_layer_bytes=kv_layer, fits=not why, why=why, extra_bufts_off=off,
    )
