"""Real `Plan`s for tests: the planner on a fixed model shape and a fixed machine, then fields replaced."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from corral.convert.llama_family import LlamaHParams
from corral.convert.units import GiB
from corral.offload.api import PlanOptions, plan_profile
from corral.offload.catalog import ModelShape
from corral.offload.hardware import Hardware
from corral.offload.load_settings import LoadSettings
from corral.offload.plan import Plan
from corral.offload.profile import profile_from_shape

# The shape of tests.helpers.engine.write_tiny_gguf's default model.
TINY_SHAPE = ModelShape("Tiny Llama 3", LlamaHParams(n_embd=64, n_layer=2, n_head=2, n_head_kv=1, n_ff=128,
                                                     n_ctx_train=8192, rope_scaling=None))
# A CPU-only machine with room to spare and measured (made-up) bandwidths: plans on it fit and do not warn.
CPU_MACHINE = Hardware(ram_total=64 * GiB, ram_available=48 * GiB, cpu_cores=4, cpu_threads=8,
                       cpu_name="test CPU", ram_bandwidth=50e9, disk_bandwidth=3e9, bandwidth_measured=True,
                       source="test")
# One thread, no GPU, a 1024-token context, flash attention off: what the runtime tests load models with.
CPU_OPTIONS = PlanOptions(n_ctx=1024, n_threads=1, n_gpu_layers=0, flash_attn=False)

_LOAD_FIELDS = frozenset(f.name for f in fields(LoadSettings))


def make_plan(shape: ModelShape = TINY_SHAPE, quant: str = "F16", options: PlanOptions = CPU_OPTIONS,
              hardware: Hardware = CPU_MACHINE, **changes: Any) -> Plan:
    """The planner's plan for `shape` as `quant` on `hardware`, with `changes` applied: names of `Plan` fields
    (fits, advice, devices, ...) replace those, names of `LoadSettings` fields (tensor_overrides, n_ctx, ...)
    replace those in `plan.load`. `devices` is both: DevicePlan values are the plan's rows, device names (str)
    the load settings' ggml devices."""
    plan = plan_profile(profile_from_shape(shape, quant), options, hardware)
    rows = "devices" in changes and not all(isinstance(d, str) for d in changes["devices"])
    load = {k: changes.pop(k) for k in list(changes) if k in _LOAD_FIELDS and not (k == "devices" and rows)}
    for key in ("devices", "warnings", "advice"):
        if key in changes:
            changes[key] = tuple(changes[key])
    return replace(plan, load=replace(plan.load, **load), **changes)
