"""How fast llama.cpp's CPU kernels decode on a machine: per weight type, weights/s, and the per-token overhead.

The numbers come from a short measurement on the machine itself (`cpu_measure`, cached); `TYPICAL_AVX2` holds
what that measurement gives on a 2-core AVX2 AMD EPYC (Zen 3) VM and is used only when nothing was measured.
This module is pure: values, the fit from timings to rates, and JSON conversion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from corral.convert.errors import InvalidFile


@dataclass(frozen=True)
class Overhead:
    """Per-token decode time outside the weight matrices: graph build and launch, per layer, per vocab entry
    (logits buffer and sampling)."""

    fixed_s: float
    per_layer_s: float
    per_vocab_s: float

    def seconds(self, n_layer: int, n_vocab: int) -> float:
        return self.fixed_s + self.per_layer_s * n_layer + self.per_vocab_s * n_vocab


@dataclass(frozen=True)
class TypeRate:
    """Matrix-vector speed of one weight type: weights/s with one thread and with `CpuRates.threads` threads."""

    name: str  # GGMLQuantizationType name: F16, Q4_K, ...
    one_thread: float
    all_threads: float


@dataclass(frozen=True)
class CpuRates:
    """Decode rates of llama.cpp's CPU backend on one machine, measured with 1 and `threads` threads."""

    threads: int
    use_extra_bufts: bool
    overhead_one: Overhead
    overhead_all: Overhead
    types: tuple[TypeRate, ...] = ()
    measured: bool = True  # False: typical values; then rates keep scaling past `threads`

    def rate(self, type_name: str) -> TypeRate | None:
        return next((t for t in self.types if t.name == type_name), None)

    def weights_per_s(self, type_name: str, threads: int) -> float | None:
        """Weights/s of `type_name` matrices decoded with `threads` threads (None when not known)."""
        r = self.rate(type_name)
        return None if r is None else self.speed(r, threads)

    def speed(self, r: TypeRate, threads: int) -> float:
        """Weights/s of a type with rates `r` on `threads` threads of this machine."""
        return r.one_thread * max(1, threads) * self._efficiency(r, threads)

    def _efficiency(self, r: TypeRate, threads: int) -> float:
        """Per-thread speed relative to one thread: 1 at one thread, measured at `self.threads`, linear between;
        a measured machine gains nothing past its cores, typical values keep the last efficiency."""
        n = max(1, threads)
        if self.threads <= 1 or n == 1:
            return 1.0
        e_all = r.all_threads / (self.threads * r.one_thread)
        if n >= self.threads:
            return e_all * self.threads / n if self.measured else e_all
        return 1.0 + (e_all - 1.0) * (n - 1) / (self.threads - 1)

    def overhead(self, threads: int) -> Overhead:
        return self.overhead_one if threads <= 1 else self.overhead_all

    def with_types(self, types: Sequence[TypeRate]) -> CpuRates:
        """These rates with `types` added (replacing any of the same name)."""
        names = {t.name for t in types}
        kept = tuple(t for t in self.types if t.name not in names)
        return CpuRates(self.threads, self.use_extra_bufts, self.overhead_one, self.overhead_all,
                        kept + tuple(types), self.measured)

    def to_json(self) -> dict[str, Any]:
        return {"threads": self.threads, "use_extra_bufts": self.use_extra_bufts, "measured": self.measured,
                "overhead_one": _overhead_json(self.overhead_one), "overhead_all": _overhead_json(self.overhead_all),
                "types": {t.name: [t.one_thread, t.all_threads] for t in self.types}}


def _overhead_json(o: Overhead) -> list[float]:
    return [o.fixed_s, o.per_layer_s, o.per_vocab_s]


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise InvalidFile(f"cpu_rates: {what} must be a positive number")
    return float(value)


def _overhead_from(value: Any, what: str) -> Overhead:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise InvalidFile(f"cpu_rates: {what} must be [fixed_s, per_layer_s, per_vocab_s]")
    fixed, layer, vocab = (float(v) if isinstance(v, (int, float)) and v >= 0 else -1.0 for v in value)
    if min(fixed, layer, vocab) < 0:
        raise InvalidFile(f"cpu_rates: {what} must hold non-negative numbers")
    return Overhead(fixed, layer, vocab)


def rates_from_json(data: Mapping[str, Any]) -> CpuRates:
    """CpuRates from `to_json`'s dict (a hardware file or the cache); bad values raise InvalidFile."""
    if not isinstance(data, Mapping):
        raise InvalidFile("cpu_rates must be an object")
    threads = data.get("threads")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidFile("cpu_rates: threads must be a positive integer")
    types = data.get("types", {})
    if not isinstance(types, Mapping):
        raise InvalidFile("cpu_rates: types must map a type name to [one thread, all threads] weights/s")
    rates = []
    for name, pair in types.items():
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise InvalidFile(f"cpu_rates: types.{name} must be [one thread, all threads] weights/s")
        rates.append(TypeRate(str(name), _positive(pair[0], f"types.{name}"), _positive(pair[1], f"types.{name}")))
    return CpuRates(threads, bool(data.get("use_extra_bufts", True)),
                    _overhead_from(data.get("overhead_one"), "overhead_one"),
                    _overhead_from(data.get("overhead_all"), "overhead_all"), tuple(rates),
                    bool(data.get("measured", True)))


# ---------------------------------------------------------------- from timings to rates

@dataclass(frozen=True)
class Timing:
    """Seconds per decoded token of one measurement model, with 1 thread and with all threads."""

    n_layer: int
    n_vocab: int
    weights: int  # matrix weights multiplied per token (token embeddings excluded: one row is read)
    one_thread_s: float
    all_threads_s: float


def fit_overhead(skeletons: Sequence[Timing], *, all_threads: bool, skeleton_rate: float) -> Overhead:
    """Least-squares fit of t = fixed + per_layer x n_layer + per_vocab x n_vocab over models whose weights are
    tiny (their time at `skeleton_rate` weights/s is taken off first). Negative terms are clamped to 0."""
    import numpy as np

    rows = np.array([[1.0, s.n_layer, s.n_vocab] for s in skeletons])
    t = np.array([(s.all_threads_s if all_threads else s.one_thread_s) - s.weights / skeleton_rate
                  for s in skeletons])
    coef, *_ = np.linalg.lstsq(rows, t, rcond=None)
    fixed, layer, vocab = (max(0.0, float(c)) for c in coef)
    if fixed == 0.0 and t.size:  # keep the fit's total at the smallest model
        fixed = max(0.0, float(t.min() - layer * rows[t.argmin(), 1] - vocab * rows[t.argmin(), 2]))
    return Overhead(fixed, layer, vocab)


def type_rate(name: str, timing: Timing, one: Overhead, many: Overhead, threads: int) -> TypeRate:
    """Weights/s of one type from a model whose matrices are all that type: its time less the fitted overhead.
    The type models are sized so that their weights take most of the time; an overhead fitted above half of it
    means other processes disturbed the skeleton runs, so at most half is taken off."""
    rates = []
    for seconds, over in ((timing.one_thread_s, one), (timing.all_threads_s, many)):
        left = seconds - min(over.seconds(timing.n_layer, timing.n_vocab), 0.5 * seconds)
        rates.append(timing.weights / left)
    # More threads are not slower on an idle machine: a lower reading means other processes held cores while
    # the thread pool waited for its slowest thread, which would stay in the cache long after they are gone.
    return TypeRate(name, rates[0], rates[0] if threads <= 1 else max(rates[0], rates[1]))


def undisturbed(t: Timing, threads: int) -> Timing:
    """`t` with its all-threads time capped at `threads` x its one-thread time: on an idle machine each thread
    does at most the whole work, so anything longer is time other processes held a core while the pool waited."""
    return replace(t, all_threads_s=min(t.all_threads_s, max(1, threads) * t.one_thread_s))


def fit_rates(skeletons: Sequence[Timing], typed: Mapping[str, Timing], *, threads: int, use_extra_bufts: bool,
              skeleton_rate: float) -> CpuRates:
    """CpuRates from the timings of the overhead skeletons and of one model per weight type."""
    skeletons = [undisturbed(t, threads) for t in skeletons]
    typed = {name: undisturbed(t, threads) for name, t in typed.items()}
    one = fit_overhead(skeletons, all_threads=False, skeleton_rate=skeleton_rate)
    many = fit_overhead(skeletons, all_threads=True, skeleton_rate=skeleton_rate * max(1, threads))
    types = tuple(type_rate(name, t, one, many, threads) for name, t in typed.items())
    return CpuRates(threads, use_extra_bufts, one, many, types)


# ---------------------------------------------------------------- typical values (used when not measured)

def _typical(pairs: Mapping[str, tuple[float, float]]) -> tuple[TypeRate, ...]:
    return tuple(TypeRate(name, one, both) for name, (one, both) in pairs.items())


# What `cpu_measure` gives on a 2-core AVX2 AMD EPYC (Zen 3, KVM guest, 32 MiB L3) with llama.cpp as shipped in
# llama-cpp-python 0.3.36, extra buffers on (Q4_0, Q4_K, IQ4_NL repacked): weights/s with 1 thread and with
# 2 threads, and the per-token overheads (BENCHMARKS.md, "generation speed"). A typical AVX2 desktop core is in the
# same range; AVX-512 and many-core machines differ, which is why a detected machine is measured instead.
TYPICAL_AVX2 = CpuRates(
    threads=2, use_extra_bufts=True, measured=False,
    overhead_one=Overhead(fixed_s=2.9e-5, per_layer_s=7.4e-6, per_vocab_s=9.4e-9),
    overhead_all=Overhead(fixed_s=2.7e-5, per_layer_s=3.0e-5, per_vocab_s=1.2e-8),
    types=_typical({
        "F32": (2.7e9, 5.1e9), "F16": (4.2e9, 7.3e9), "BF16": (4.3e9, 6.8e9), "Q8_0": (7.5e9, 1.1e10),
        "Q6_K": (6.9e9, 1.3e10), "Q5_K": (8.0e9, 1.4e10), "Q4_K": (9.3e9, 1.6e10), "Q4_0": (9.4e9, 1.3e10),
        "IQ4_NL": (1.1e10, 1.8e10), "IQ4_XS": (1.1e10, 1.8e10), "Q3_K": (1.0e10, 1.5e10), "IQ3_S": (6.0e9, 9.3e9),
        "IQ3_XXS": (6.6e9, 9.7e9), "Q2_K": (1.7e10, 2.5e10), "IQ2_S": (6.1e9, 1.1e10),
        "IQ2_XS": (7.8e9, 1.4e10), "IQ2_XXS": (9.3e9, 1.4e10), "IQ1_M": (5.8e9, 9.8e9), "IQ1_S": (6.0e9, 1.0e10),
    }),
)
# Types not in the table (Q4_1, Q5_0, Q5_1, ...): the slowest quantized type above.
TYPICAL_OTHER = TypeRate("other", 5.8e9, 9.8e9)
