"""plan_model(): the one entry point: (model, options, hardware) -> Plan. Pure apart from hardware detection."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from corral.convert.errors import UsageError
from corral.convert.units import format_bytes as human

from . import cpu_measure, cpu_probe, memory, quality, rpc, speculation, throughput
from .hardware import Hardware, detect_hardware
from .load_settings import LoadSettings, resolve_flash_attn
from .plan import Plan
from .profile import ModelProfile, load_profile
from .quality import MeasuredQuality
from .solver import Costs, Placement, Settings, solve

BASE_CTX = 4096  # the context every plan is first solved at; auto-fit then grows it while nothing degrades
MIN_CTX = 256


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked for; None means 'choose for me'."""

    n_ctx: int | None = None
    kv_type: str = "f16"
    n_batch: int = 2048
    n_ubatch: int = 512
    n_threads: int | None = None
    quant: str | None = None
    n_gpu_layers: int | None = None
    flash_attn: bool | None = None
    draft: str | None = None  # a draft model for speculative decoding, planned first (GPU first)
    draft_acceptance: float = speculation.DEFAULT_ACCEPTANCE  # assumed, for the speed-up estimate
    draft_max: int = 8


def plan_model(model: str | Path, options: PlanOptions = PlanOptions(), hardware: Hardware | None = None) -> Plan:
    """Plan where every tensor of `model` goes on `hardware` (detected when None)."""
    profile, notes = load_profile(model, options.quant)
    path = profile.files[0] if profile.files else None
    if hardware is None or hardware.source == "detected":
        hardware = cpu_probe.check_extra_buffers(hardware or detect_hardware(path), profile)
    draft = None
    if options.draft is not None:  # the draft first: it runs k times per step, so it gets the GPU first
        draft = plan_model(options.draft, PlanOptions(n_ctx=options.n_ctx or BASE_CTX, kv_type=options.kv_type,
                                                      n_threads=options.n_threads),
                           replace(hardware, rpc_workers=()))  # the draft stays on this machine
        hardware = speculation.reserve(hardware, draft)
    plan = plan_profile(profile, options, hardware, notes=notes, model_path=str(path) if path else None)
    plan = _with_cpu_rates(plan, profile, options, hardware, notes, path)
    return plan if draft is None else speculation.with_draft(plan, draft, options.draft_acceptance, options.draft_max)


def _with_cpu_rates(plan: Plan, profile: ModelProfile, options: PlanOptions, hw: Hardware, notes: list[str],
                    path: Path | None) -> Plan:
    """Re-estimate with llama.cpp's CPU rates measured on this machine for the plan's weight types (detected
    hardware only; cached after the first time). Placement does not depend on the rates, only the speed."""
    measured, warning = cpu_measure.with_measured_rates(hw, profile, plan)
    if measured is hw and warning is None:
        return plan
    notes = [*notes, *([warning] if warning else [])]
    return plan_profile(profile, options, measured, notes=notes, model_path=str(path) if path else None)


def _validate(o: PlanOptions) -> None:
    memory.kv_type(o.kv_type)
    if o.n_ctx is not None and o.n_ctx < 1:
        raise UsageError("--ctx must be positive")
    if o.n_batch < 1 or o.n_ubatch < 1:
        raise UsageError("--batch and --ubatch must be positive")
    if o.n_threads is not None and o.n_threads < 1:
        raise UsageError("--threads must be positive")
    resolve_flash_attn(o.kv_type, o.flash_attn)


def plan_profile(profile: ModelProfile, options: PlanOptions, hw: Hardware, *, notes: list[str] | None = None,
                 model_path: str | None = None) -> Plan:
    """The planner proper, for an already-built profile (no file access)."""
    _validate(options)
    warnings = list(notes or [])
    costs = Costs(profile)
    flash = resolve_flash_attn(options.kv_type, options.flash_attn)
    base = Settings(n_ctx=MIN_CTX, kv_type=options.kv_type.lower(), n_batch=options.n_batch,
                    n_ubatch=options.n_ubatch, flash_attn=flash, n_gpu_layers=options.n_gpu_layers)

    def at(ctx: int, repack: bool = True) -> Placement:
        nb, nu = memory.batches(ctx, options.n_batch, options.n_ubatch)
        return solve(profile, hw, replace(base, n_ctx=ctx, n_batch=nb, n_ubatch=nu, repack=repack), costs)

    limit = memory.pad_ctx(profile.n_ctx_train)
    if options.n_ctx is not None:
        ctx = memory.pad_ctx(options.n_ctx)
        if ctx > limit:
            warnings.append(f"context cut from {options.n_ctx} to the model's limit of {profile.n_ctx_train}")
            ctx = limit
        placement = at(ctx)
        if not placement.fits and placement.repack:
            placement = at(ctx, repack=False)
    else:
        placement = _auto_ctx(at, limit, warnings)
    speed = throughput.estimate(profile, hw, placement, threads=_threads(options, hw))
    return _build(profile, hw, options, placement, speed, warnings, model_path)


def _no_worse(p: Placement, ref: Placement) -> bool:
    return (p.fits and p.n_full >= ref.n_full and p.n_attn_only >= ref.n_attn_only
            and p.disk_stream_bytes <= ref.disk_stream_bytes and p.swap_bytes <= ref.swap_bytes)


def _auto_ctx(at: Any, limit: int, warnings: list[str]) -> Placement:
    """Largest context (multiple of 256, up to the model's limit) that costs no GPU layers, no extra disk
    streaming and no swap compared with a BASE_CTX plan; below BASE_CTX only when that is all that fits."""
    start = min(BASE_CTX, limit)
    ref = at(start)
    if not ref.fits and ref.repack:
        ref = at(start, repack=False)
    if ref.fits:
        lo, hi = start // memory.CTX_PAD, limit // memory.CTX_PAD
        best = ref
        repack = ref.repack or not any(d.repack_bytes for d in ref.devices)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            p = at(mid * memory.CTX_PAD, repack)
            if _no_worse(p, ref):
                lo, best = mid, p
            else:
                hi = mid - 1
        return best
    lo, hi = 1, start // memory.CTX_PAD - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        p = at(mid * memory.CTX_PAD, False)
        if p.fits:
            best, lo = p, mid + 1
        else:
            hi = mid - 1
    if best is None:
        return ref
    warnings.append(f"context cut to {best.settings.n_ctx} tokens: that is all that fits")
    return best


def _threads(o: PlanOptions, hw: Hardware) -> int:
    return o.n_threads or max(1, hw.cpu_cores)


def _build(profile: ModelProfile, hw: Hardware, o: PlanOptions, p: Placement, speed: throughput.Speed,
           warnings: list[str], model_path: str | None) -> Plan:
    s = p.settings
    threads = _threads(o, hw)
    split = tuple(float(x) for x in p.gpu_counts) if (hw.gpus or hw.rpc_workers) and p.n_gpu_layers else ()
    # every worker is registered; without local GPUs the devices are named (the workers', in --rpc order), with
    # them llama.cpp's default order is the same (workers first, then GPUs) and names the GPUs itself
    servers = tuple(w.endpoint for w in hw.rpc_workers)
    names = tuple(d.name for w in hw.rpc_workers for d in w.devices) if not hw.gpus else ()
    overrides: tuple[tuple[str, str], ...] = ()
    if p.attn_only_layers:
        ids = "|".join(str(i) for i in p.attn_only_layers)
        overrides = ((rf"blk\.({ids})\.ffn_(up|down|gate)\.weight", "CPU"),)
    load = LoadSettings(
        n_ctx=s.n_ctx, n_gpu_layers=p.n_gpu_layers, n_batch=s.n_batch, n_ubatch=s.n_ubatch, n_threads=threads,
        n_threads_batch=max(threads, hw.cpu_threads if o.n_threads is None else threads), kv_type=s.kv_type,
        flash_attn=s.flash_attn, use_extra_bufts=s.repack, tensor_split=split, split_mode="layer",
        tensor_overrides=overrides, rpc_servers=servers, devices=names)
    warnings += _warnings(profile, hw, p, speed)
    advice = _advice(profile, hw, o, p, speed)
    return Plan(
        model=profile.name, model_path=model_path, source=profile.source, quant=profile.quant,
        file_bytes=profile.file_bytes, n_params=profile.n_params, fits=p.fits, why=p.why,
        n_ctx_train=profile.n_ctx_train, n_layers=profile.n_layer + 1, load=load,
        tokens_per_second=speed.tokens_per_second, prompt_tokens_per_second=speed.prompt_tokens_per_second,
        disk_stream_bytes=p.disk_stream_bytes, devices=p.devices, warnings=tuple(dict.fromkeys(warnings)),
        advice=tuple(advice), headline=_headline(profile, p, speed), hardware_source=hw.source,
        ram_limit=hw.ram_limit, time_per_token=speed.seconds_by_tier,
    )


def _headline(profile: ModelProfile, p: Placement, speed: throughput.Speed) -> str:
    parts = []
    for d in p.devices:
        if d.kind == "gpu" and d.weights_bytes:
            parts.append(f"{human(d.total_bytes)} on {d.name}")
        elif d.kind == "rpc" and d.weights_bytes:
            parts.append(f"{human(d.total_bytes)} on {d.name} ({d.endpoint})")
        elif d.kind == "cpu" and d.total_bytes:
            parts.append(f"{human(d.total_bytes)} in RAM")
        elif d.kind == "disk":
            parts.append(f"{human(d.weights_bytes)} streamed from disk")
    ctx = p.settings.n_ctx
    ctx_s = f"{ctx // 1024}K" if ctx % 1024 == 0 else str(ctx)
    tps = speed.tokens_per_second
    rate = f"{tps:.0f}" if tps >= 10 else f"{tps:.1f}" if tps >= 0.1 else f"{tps:.2f}"
    verdict = "" if p.fits else " — DOES NOT FIT"
    return f"{profile.name} {profile.quant}: {', '.join(parts)}, ~{rate} tok/s at {ctx_s} context{verdict}"


def _warnings(profile: ModelProfile, hw: Hardware, p: Placement, speed: throughput.Speed) -> list[str]:
    out = []
    if p.disk_stream_bytes:
        sec = throughput.disk_read_seconds(p.disk_stream_bytes, hw)
        cpu = next(d for d in p.devices if d.kind == "cpu")
        plain = throughput.mmap_read_bytes(cpu.weights_bytes - cpu.repack_bytes + p.disk_stream_bytes,
                                           cpu.weights_bytes - cpu.repack_bytes)
        out.append(f"{human(p.disk_stream_bytes)} of weights do not fit in RAM and will be read from disk for "
                   f"EVERY token (~{sec:.1f} s per token at {hw.disk_bandwidth / 1e9:.1f} GB/s, read ahead of "
                   f"compute by corral; plain mmap, e.g. llama-cli, reads ~{human(plain)} per token)")
    if p.swap_bytes:
        out.append(f"{human(p.swap_bytes)} beyond available RAM would go to swap: expect heavy slowdowns")
    if not p.fits:
        out.append(f"does not fit: {p.why}")
    if profile.n_ctx_train and p.settings.n_ctx < min(profile.n_ctx_train, BASE_CTX):
        out.append(f"context is only {p.settings.n_ctx} tokens")
    if p.extra_bufts_off:
        out.append(f"llama.cpp's {' and '.join(p.extra_bufts_off)} CPU buffer crashed a test run on this machine: "
                   "loading without extra buffers (slower CPU matmuls; `corral info --hardware` shows why)")
    if not hw.bandwidth_measured and hw.source == "detected":
        out.append("bandwidths are typical values, not measured on this machine")
    return out + _rpc_warnings(hw, p)


def _rpc_warnings(hw: Hardware, p: Placement) -> list[str]:
    out = []
    rows = [d for d in p.devices if d.kind == "rpc"]
    for d in rows:
        if not d.fits:
            line = rpc.shortfall(d.endpoint, d.name, d.capacity_bytes, d.total_bytes)
            out += [line] if line != p.why else []
        elif not d.weights_bytes and p.n_gpu_layers:
            out.append(f"worker {d.endpoint} ({d.name}) gets no layers: {human(d.capacity_bytes)} is too little "
                       "for one layer with its compute buffer")
    for w in hw.rpc_workers:
        if not w.link.measured:
            out.append(f"the link to worker {w.endpoint} was not measured: assuming gigabit Ethernet")
    guessed = sorted({w.endpoint for w in hw.rpc_workers for dev in w.devices if dev.bandwidth is None})
    if guessed:
        out.append(f"memory bandwidth of worker {', '.join(guessed)} unknown: a CPU device taken to read like this "
                   f"machine's RAM ({hw.ram_bandwidth / 1e9:.1f} GB/s), a GPU like a typical card "
                   "(--rpc-memory-bandwidth sets it)")
    return out


def _advice(profile: ModelProfile, hw: Hardware, o: PlanOptions, p: Placement,
            speed: throughput.Speed) -> list[str]:
    out = []
    if p.disk_stream_bytes:
        out.append(f"add {human(p.disk_stream_bytes)} of RAM, or use a smaller quant (--best-quant), to stop "
                   "streaming from disk")
    if p.settings.kv_type == "f16" and (p.disk_stream_bytes or not p.fits or p.n_full < profile.n_layer + 1
                                         and hw.gpus):
        out.append("--kv-type q8_0 halves the KV cache (q4_0 quarters it)")
    if hw.gpus and p.n_full < profile.n_layer + 1:
        missing = sum(d.weights_bytes for d in p.devices if d.kind in ("cpu", "disk"))
        out.append(f"{human(missing)} more GPU memory would put every layer on GPU")
    if not hw.gpus and not hw.rpc_workers and profile.n_layer > 40:
        out.append("a GPU holding even a few layers (attention + KV) speeds up generation")
    if o.n_ctx and p.settings.n_ctx > BASE_CTX and (not p.fits or p.disk_stream_bytes):
        out.append(f"a smaller --ctx (e.g. {BASE_CTX}) frees {human(p.kv_layer_bytes * profile.n_layer)} of KV")
    return out


# ---------------------------------------------------------------- --best-quant

BEST_QUANT_CANDIDATES = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_XXS", "Q2_K",
                         "IQ2_M", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


@dataclass(frozen=True)
class QuantRow:
    """One row of --best-quant: the plan for one quant type."""

    quant: str
    plan: Plan
    quality: MeasuredQuality | None = None  # corral's measurement of this type's quality loss, when shipped

    @property
    def kld(self) -> float | None:
        """Mean KL divergence from the unquantized model (measured; 0 for unquantized types)."""
        return quality.kld(self.quant, {self.quant: self.quality} if self.quality else {})

    def to_json(self) -> dict[str, Any]:
        by = {k: sum(d.total_bytes if k != "disk" else d.weights_bytes for d in self.plan.devices if d.kind == k)
              for k in ("gpu", "rpc", "cpu", "disk")}
        return {"quant": self.quant, "fits": self.plan.fits, "file_bytes": self.plan.file_bytes,
                "gpu_bytes": by["gpu"], "worker_bytes": by["rpc"], "ram_bytes": by["cpu"], "disk_bytes": by["disk"],
                "n_ctx": self.plan.n_ctx,
                "tokens_per_second": self.plan.tokens_per_second,
                "quality": self.quality.to_json() if self.quality else None}


def best_quant(model: str | Path, options: PlanOptions = PlanOptions(),
               hardware: Hardware | None = None) -> tuple[list[QuantRow], str | None]:
    """A plan per quant type for the model's shapes, and the recommended type (None if nothing fits)."""
    from .catalog import ModelShape
    from .profile import profile_from_shape

    profile, _ = load_profile(model, options.quant or "Q4_K_M")
    shape = ModelShape(profile.name, profile.hparams)
    if hardware is None:
        hardware = detect_hardware(profile.files[0] if profile.files else None)
    table = quality.measured()
    rows = []
    for q in quality.by_quality(list(BEST_QUANT_CANDIDATES), table):
        prof = profile_from_shape(shape, q, source=profile.source)
        rows.append(QuantRow(q, plan_profile(prof, replace(options, quant=q), hardware), table.get(q)))
    return rows, recommend(rows)


def recommend(rows: list[QuantRow]) -> str | None:
    """The most precise type (rows come ordered by measured quality) that fits without disk streaming at a usable
    speed (at least a quarter of the fastest option's, capped at 5 tok/s); if everything streams, the fastest that
    fits."""
    ok = [r for r in rows if r.plan.fits and not r.plan.disk_stream_bytes]
    if ok:
        fastest = max(r.plan.tokens_per_second for r in ok)
        usable = min(5.0, fastest / 4)
        return next(r.quant for r in ok if r.plan.tokens_per_second >= usable)  # rows: least loss first
    fitting = [r for r in rows if r.plan.fits]
    return max(fitting, key=lambda r: r.plan.tokens_per_second).quant if fitting else None
