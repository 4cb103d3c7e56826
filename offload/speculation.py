"""Planning a draft model for speculative decoding: its memory comes first, and the expected speed-up.

The draft is planned on its own first (GPU first when there is room: it runs k times per step),
and what it takes is removed from the machine the target is planned on. With acceptance rate a
(the chance that the target keeps a drafted token) and k drafted tokens per step, the expected
number of tokens one target pass produces is (1 - a^(k+1)) / (1 - a) (Leviathan et al. 2023). A
step costs k draft tokens plus one target pass over k+1 tokens, which for a memory-bound target
costs about one token's pass (its weights are read once), so

    speed with the draft = tokens_per_pass(a, k) / (k * t_draft + t_target)

with t = seconds per token of each model alone. The estimate takes the best k up to draft_max; when
even that is slower than the target alone, the runtime switches drafting off (speed-up 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hardware import Hardware
    from .plan import Plan

DEFAULT_ACCEPTANCE = 0.7  # typical of a Llama 3.2 1B/3B drafting for a Llama 3.1 model on chat text


def tokens_per_pass(acceptance: float, k: int) -> float:
    """Expected tokens one target pass yields with k drafted tokens accepted with probability `acceptance`."""
    a = min(max(acceptance, 0.0), 1.0)
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass(frozen=True)
class SpeculativeEstimate:
    """What drafting should give: at the best k, tokens per pass and per second, and the speed-up."""

    acceptance: float
    draft_max: int
    k: int
    tokens_per_pass: float
    plain_tokens_per_second: float
    tokens_per_second: float
    speedup: float  # 1.0 when drafting does not pay (the runtime then switches it off)

    @property
    def pays(self) -> bool:
        return self.speedup > 1.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pays": self.pays}


def estimate(target_tps: float, draft_tps: float, acceptance: float = DEFAULT_ACCEPTANCE,
             draft_max: int = 8) -> SpeculativeEstimate:
    """The speed with a draft running at `draft_tps` for a target running at `target_tps` (tokens/s alone)."""
    if target_tps <= 0 or draft_tps <= 0:
        return SpeculativeEstimate(acceptance, draft_max, 0, 1.0, target_tps, target_tps, 1.0)
    t_target, t_draft = 1.0 / target_tps, 1.0 / draft_tps
    best_k, best = 0, target_tps
    for k in range(1, max(1, draft_max) + 1):
        speed = tokens_per_pass(acceptance, k) / (k * t_draft + t_target)
        if speed > best:
            best_k, best = k, speed
    per_pass = tokens_per_pass(acceptance, best_k) if best_k else 1.0
    return SpeculativeEstimate(acceptance, draft_max, best_k, per_pass, target_tps, best, best / target_tps)


def reserve(hw: Hardware, draft: Plan) -> Hardware:
    """The machine left for the target once the draft's weights, KV cache and compute buffers are placed."""
    gpus = list(hw.gpus)
    ram = hw.ram_available
    for d in draft.devices:
        if d.kind == "gpu":
            i = int(d.name[3:]) if d.name[3:].isdigit() else -1
            if 0 <= i < len(gpus):
                gpus[i] = replace(gpus[i], free_bytes=max(0, gpus[i].free_bytes - d.total_bytes))
        elif d.kind == "cpu":
            ram -= d.total_bytes
    return replace(hw, gpus=tuple(gpus), ram_available=max(0, ram))


def with_draft(plan: Plan, draft: Plan, acceptance: float, draft_max: int) -> Plan:
    """`plan` carrying the draft's plan, the speed estimate, and the draft's warnings."""
    spec = estimate(plan.tokens_per_second, draft.tokens_per_second, acceptance, draft_max)
    warnings = list(plan.warnings)
    if draft.disk_stream_bytes:
        warnings.append(f"the draft {draft.model} does not fit in memory next to the model: drafting will be slow")
    if not draft.fits:
        warnings.append(f"the draft {draft.model} does not fit: {draft.why}")
    return replace(plan, draft=draft, speculative=spec, warnings=tuple(warnings),
                   fits=plan.fits and draft.fits, why=plan.why or (f"draft: {draft.why}" if draft.why else ""))
