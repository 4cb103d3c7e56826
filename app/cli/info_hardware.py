"""`corral info --hardware`: this machine as the planner sees it, and the verdicts on llama.cpp's CPU buffers."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from corral.convert.units import format_bytes
from corral.offload import cpu_probe, memory
from corral.offload.hardware import Hardware, detect_hardware

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile", "amx_bf16")


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def _buffer_types(name: str, hw: Hardware) -> list[str]:
    if name == "AMX":
        return sorted(t.name for t in memory.amx_types(hw.cpu_flags, False))
    return sorted(t.name for t in memory.repack_types(hw.cpu_flags, False))


def _evidence(v: cpu_probe.Verdict) -> str:
    parts = [v.detail]
    if v.signal:
        parts.append(f"child killed by {v.signal} (return code {v.returncode})")
    elif v.returncode is not None and v.returncode != 0:
        parts.append(f"child exit status {v.returncode}")
    if v.buffers:
        parts.append("llama.cpp's buffers: " + ", ".join(f"{k} {format_bytes(b)}" for k, b in sorted(v.buffers.items())))
    return "; ".join(p for p in parts if p)


def show_hardware(*, json_: bool, reprobe: bool) -> None:
    """Print the detected hardware and the CPU extra buffer verdicts (probing what is not known yet)."""
    hw = detect_hardware(measure=False)
    verdicts = cpu_probe.machine_verdicts(hw, force=reprobe)
    debug = _debug()
    if json_:
        data: dict[str, Any] = {
            "hardware": hw.to_json(),
            "llama_cpp_build": cpu_probe.llama_build(),
            "probe_key": cpu_probe.probe_key(hw.cpu_name, hw.cpu_flags),
            "cpu_buffers": {b: {"types": _buffer_types(b, hw), "verdict": None}
                            for b in cpu_probe.buffers_for_cpu(hw.cpu_flags)},
        }
        for v in verdicts:
            data["cpu_buffers"][v.buffer]["verdict"] = v.to_json()
        click.echo(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    flags = " ".join(f for f in _FLAGS if f in hw.cpu_flags) or "none of " + " ".join(_FLAGS)
    rows = [
        ("CPU", f"{hw.cpu_name} ({hw.cpu_cores} cores, {hw.cpu_threads} threads)"),
        ("CPU features", flags),
        ("RAM", f"{format_bytes(hw.ram_available)} available of {format_bytes(hw.ram_total)}"
                f" (limit: {'the machine' if hw.ram_limit == 'machine' else hw.ram_limit})"
                f"{f', swap {format_bytes(hw.swap_free)} free' if hw.swap_total else ''}"),
        ("GPUs", ", ".join(f"{g.name} ({format_bytes(g.free_bytes)} free)" for g in hw.gpus) or "none"),
        ("llama.cpp", cpu_probe.llama_build().split(" ")[0]),
    ]
    by_name = {v.buffer: v for v in verdicts}
    for name in cpu_probe.EXTRA_BUFFERS:
        if name not in cpu_probe.buffers_for_cpu(hw.cpu_flags):
            rows.append((f"{name} buffer", "not on this CPU"))
            continue
        v = by_name.get(name)
        types = ", ".join(_buffer_types(name, hw))
        status = "not tested yet" if v is None else v.status
        rows.append((f"{name} buffer", f"{status} (weights of type {types})"))
        if v is not None:
            rows.append(("", _evidence(v)))
            if debug and v.system_info:
                rows.append(("", f"system info: {v.system_info}"))
    if debug:
        rows.append(("probe key", cpu_probe.probe_key(hw.cpu_name, hw.cpu_flags)))
    for key, value in rows:
        table.add_row(key, Text(value))
    Console().print(table)
    if any(v.broken for v in verdicts):
        click.echo("models load with extra buffers off on this machine (llama_model_params.use_extra_bufts = "
                   "false; llama.cpp flag --no-repack)")
