"""Measure llama.cpp's CPU decode rates on this machine, per weight type, in a child process; cache the result.

The child (`python -m corral.offload.cpu_measure '<json>'`) writes tiny Llama GGUFs (all-zero weights in a
sparse file: the kernels do the same work on any data), loads each with llama.cpp as corral would
(`use_extra_bufts` as the plan says), and times greedy decoding token by token with 1 thread and with all
threads. Three skeleton models (tiny matrices; 1 or many layers; small or large vocabulary) give the per-token
overhead; one model per weight type (34M weights of that type) gives its weights/s. A native crash or a
hang only costs the measurement: the parent then keeps the typical rates and says so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cpu_rates import TYPICAL_AVX2, CpuRates, Timing, fit_rates, rates_from_json, type_rate, undisturbed

CACHE_FILE = "cpu_rates.json"
CHILD_TIMEOUT_S = 90.0
TOKENS = 16  # timed tokens per model and thread count (after WARMUP), fewer when they take over BUDGET_S
WARMUP = 2
BUDGET_S = 0.4
MIN_TOKENS = 4
DISABLE_ENV = "CORRAL_CPU_RATES"  # "off": never measure (the test suite sets it; plans use typical rates)

if TYPE_CHECKING:
    from .hardware import Hardware
    from .plan import Plan
    from .profile import ModelProfile

Runner = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Shape:
    """A measurement model: Llama layout, every matrix of one type (token embeddings F32, norms F32)."""

    key: str
    ggml_type: str
    n_embd: int
    n_head: int
    n_ff: int
    n_layer: int
    n_vocab: int

    @property
    def weights(self) -> int:
        """Matrix weights multiplied per decoded token (attention q/k/v/o, gate/up/down, output head)."""
        e, f = self.n_embd, self.n_ff
        return self.n_layer * (4 * e * e + 3 * e * f) + self.n_vocab * e


SKELETON_TYPE = "F32"
SKELETONS = (Shape("skeleton-1", SKELETON_TYPE, 32, 1, 32, 1, 256),
             Shape("skeleton-layers", SKELETON_TYPE, 32, 1, 32, 24, 256),
             Shape("skeleton-vocab", SKELETON_TYPE, 32, 1, 32, 1, 32768))


def type_shape(type_name: str) -> Shape:
    """The per-type model: two layers 1024 wide with a 4096 FFN, 34M weights (a few ms per token for any type;
    17 MiB of Q4_K, 64 MiB of F16: the larger types already stream from RAM as real models do)."""
    return Shape(f"type-{type_name}", type_name, 1024, 8, 4096, 2, 256)


def cache_key(cpu_name: str, threads: int, use_extra_bufts: bool) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        llama = version("llama_cpp_python")
    except PackageNotFoundError:
        llama = "unknown"
    return f"{cpu_name}|llama-cpp-python {llama}|threads={threads}|extra_bufts={int(use_extra_bufts)}"


def _read(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads((cache / CACHE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(cache: Path, data: dict[str, Any]) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache, delete=False, suffix=".tmp") as fh:
            json.dump(data, fh, indent=1)
        os.replace(fh.name, cache / CACHE_FILE)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def cached_rates(key: str, cache: Path) -> CpuRates | None:
    entry = _read(cache).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        return rates_from_json(entry)
    except Exception:  # a damaged entry is measured again
        return None


def measure_rates(types: Iterable[str], *, cpu_name: str, threads: int, use_extra_bufts: bool,
                  cache: Path | None = None, runner: Runner | None = None) -> tuple[CpuRates | None, str | None]:
    """Rates for `types` (GGMLQuantizationType names), from the cache or measured now for the missing ones.
    Returns (rates or None, why the measurement failed or None)."""
    from .hardware import cache_dir

    folder = cache or cache_dir()
    key = cache_key(cpu_name, threads, use_extra_bufts)
    have = cached_rates(key, folder)
    wanted = sorted(set(types))
    missing = [t for t in wanted if have is None or have.rate(t) is None]
    if not missing:
        return have, None
    shapes = ([] if have is not None else list(SKELETONS)) + [type_shape(t) for t in missing]
    spec = {"threads": sorted({1, max(1, threads)}), "use_extra_bufts": use_extra_bufts, "tokens": TOKENS,
            "warmup": WARMUP, "models": [asdict(s) for s in shapes]}
    try:
        result = (runner or run_child)(spec)
        timings = _timings(shapes, result, threads)
    except MeasureFailed as exc:
        return have, str(exc)
    skeletons = [timings[s.key] for s in SKELETONS] if have is None else []
    typed = {s.ggml_type: timings[s.key] for s in shapes if s.key.startswith("type-")}
    skeleton_rate = TYPICAL_AVX2.rate(SKELETON_TYPE).one_thread  # type: ignore[union-attr]
    if have is None:
        rates = fit_rates(skeletons, typed, threads=threads, use_extra_bufts=use_extra_bufts,
                          skeleton_rate=skeleton_rate)
    else:
        rates = have.with_types([type_rate(name, undisturbed(t, threads), have.overhead_one, have.overhead_all,
                                           threads) for name, t in typed.items()])
    data = _read(folder)
    data[key] = rates.to_json()
    _write(folder, data)
    return rates, None


def plan_types(profile: ModelProfile, plan: Plan) -> list[str]:
    """Weight types whose matrices the plan multiplies on the CPU ([] when every weight is on a GPU)."""
    if not any(d.kind in ("cpu", "disk") and d.weights_bytes for d in plan.devices):
        return []
    return sorted({t.ggml_type.name for t in profile.tensors
                   if len(t.shape) >= 2 and t.kind not in ("embd", "rope", "other")})


def with_measured_rates(hw: Hardware, profile: ModelProfile, plan: Plan, *, cache: Path | None = None,
                        runner: Runner | None = None) -> tuple[Hardware, str | None]:
    """`hw` carrying measured CPU rates for the types `plan` runs on the CPU (cached, else measured now), and a
    warning when the measurement failed. Only for detected hardware (`hw.measure_cpu`); anything else as is."""
    types = plan_types(profile, plan)
    if not hw.measure_cpu or not types or os.environ.get(DISABLE_ENV, "").lower() in ("off", "0", "no"):
        return hw, None
    rates, why = measure_rates(types, cpu_name=hw.cpu_name, threads=max(1, hw.cpu_cores),
                               use_extra_bufts=plan.use_extra_bufts, cache=cache, runner=runner)
    warning = (f"CPU speed is estimated from typical AVX2 rates, not measured on this machine: {why}"
               if why else None)
    if rates is None or rates == hw.cpu_rates:
        return hw, warning
    return replace(hw, cpu_rates=rates), warning


class MeasureFailed(Exception):
    """The child did not produce timings (crash, timeout, bad output)."""


def _timings(shapes: list[Shape], result: Mapping[str, Any], threads: int) -> dict[str, Timing]:
    out = {}
    for s in shapes:
        t = result.get("timings", {}).get(s.key)
        try:
            one = float(t["1"])
            many = float(t[str(max(1, threads))])
        except (TypeError, KeyError, ValueError):
            raise MeasureFailed(f"the measurement returned no time for {s.key}") from None
        if not (math.isfinite(one) and math.isfinite(many) and one > 0 and many > 0):
            raise MeasureFailed(f"the measurement returned a bad time for {s.key}")
        out[s.key] = Timing(s.n_layer, s.n_vocab, s.weights, one, many)
    return out


def run_child(spec: dict[str, Any], timeout: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """Run the measurement in `python -m corral.offload.cpu_measure` and return its JSON."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    try:
        run = subprocess.run([sys.executable, "-m", "corral.offload.cpu_measure", json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MeasureFailed(f"timing llama.cpp's CPU kernels took over {timeout:.0f} s") from None
    except OSError as exc:
        raise MeasureFailed(f"could not start the CPU measurement: {exc}") from None
    if run.returncode != 0:
        how = f"signal {-run.returncode}" if run.returncode < 0 else f"exit code {run.returncode}"
        tail = run.stderr.strip().splitlines()[-1:] or [""]
        raise MeasureFailed(f"timing llama.cpp's CPU kernels failed ({how}) {tail[0][:200]}".rstrip())
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MeasureFailed("the CPU measurement printed no result") from None


# ---------------------------------------------------------------- the child

def write_gguf(path: Path, s: Shape) -> Path:
    """A loadable Llama GGUF of shape `s` with all-zero tensor data (sparse) and a vocabulary-less tokenizer."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quant_shape_to_byte_shape

    t = GGMLQuantizationType[s.ggml_type]
    f32 = GGMLQuantizationType.F32
    head = s.n_embd // s.n_head
    w = GGUFWriter(path, "llama")
    for key, value in (("block_count", s.n_layer), ("context_length", 4096), ("embedding_length", s.n_embd),
                       ("feed_forward_length", s.n_ff), ("attention.head_count", s.n_head),
                       ("attention.head_count_kv", s.n_head), ("rope.dimension_count", head),
                       ("vocab_size", s.n_vocab)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 500000.0)
    w.add_string("tokenizer.ggml.model", "none")
    tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = [
        ("token_embd.weight", (s.n_vocab, s.n_embd), f32), ("output_norm.weight", (s.n_embd,), f32),
        ("output.weight", (s.n_vocab, s.n_embd), t)]
    for i in range(s.n_layer):
        e, f = s.n_embd, s.n_ff
        tensors += [(f"blk.{i}.attn_norm.weight", (e,), f32), (f"blk.{i}.ffn_norm.weight", (e,), f32)]
        tensors += [(f"blk.{i}.attn_{n}.weight", (e, e), t) for n in ("q", "k", "v", "output")]
        tensors += [(f"blk.{i}.ffn_gate.weight", (f, e), t), (f"blk.{i}.ffn_up.weight", (f, e), t),
                    (f"blk.{i}.ffn_down.weight", (e, f), t)]
    data = 0
    for name, shape, ty in tensors:
        nbytes = math.prod(quant_shape_to_byte_shape(shape, ty))
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=ty)
        data += -(-nbytes // w.data_alignment) * w.data_alignment
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        fh.truncate(-(-end // w.data_alignment) * w.data_alignment + data)
    return path


def fill_weights(path: Path, seed: int = 0) -> Path:
    """Give a zero-filled GGUF plausible data in place: norms 1, float matrices N(0, 0.02), quantized blocks random
    bytes in 0x04..0x3B, so every f16 scale is finite and normal: no NaN, infinity or subnormal number changes
    the kernels' speed (on all-zero data some kernels run faster than on real weights: Q2_K by ~25%). One 4 MiB
    random block per kind is repeated: the kernels' speed does not depend on the values beyond that."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader

    T = GGMLQuantizationType
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(1 << 20, dtype=np.float32) * 0.02
    blocks = {"norm": np.ones(1 << 20, np.float32).tobytes(), T.F32: x.tobytes(),
              T.F16: x.astype(np.float16).tobytes(), T.BF16: (x.view(np.uint32) >> 16).astype(np.uint16).tobytes(),
              "quant": rng.integers(0x04, 0x3C, 1 << 22, dtype=np.uint8).tobytes()}
    tensors = [(int(t.data_offset), int(t.n_bytes), T(t.tensor_type), len(t.shape))
               for t in GGUFReader(path).tensors]
    with open(path, "r+b") as fh:
        for offset, nbytes, ty, dims in tensors:
            block = blocks["norm" if ty == T.F32 and dims == 1 else ty if ty in blocks else "quant"]
            fh.seek(offset)
            for start in range(0, nbytes, len(block)):
                fh.write(block[:min(len(block), nbytes - start)])
    return path


def _time_decode(lc: Any, ctx: Any, threads: int, tokens: int, warmup: int) -> float:
    """Seconds per token of greedy decoding one token at a time, as the engine's loop does: the lower quartile,
    so that other processes briefly taking a core (a thread pool waits for its slowest thread) count less."""
    import time

    lc.llama_set_n_threads(ctx, threads, threads)
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    one = (lc.llama_token * 1)()
    batch = lc.llama_batch_get_one(one, 1)
    try:
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        per: list[float] = []
        start = time.perf_counter()
        for i in range(warmup + tokens):
            t0 = time.perf_counter()
            one[0] = lc.llama_sampler_sample(chain, ctx, -1)
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            if i >= warmup:
                per.append(time.perf_counter() - t0)
                if len(per) >= MIN_TOKENS and time.perf_counter() - start > BUDGET_S:
                    break
        per.sort()
        return per[len(per) // 4]
    finally:
        lc.llama_sampler_free(chain)


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, load and time every model of `spec`; the result maps model key -> {threads: seconds/token}."""
    import llama_cpp as lc

    lc.llama_backend_init()
    timings: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-cpu-") as tmp:
        for raw in spec["models"]:
            s = Shape(**raw)
            path = fill_weights(write_gguf(Path(tmp) / f"{s.key}.gguf", s))
            mp = lc.llama_model_default_params()
            mp.n_gpu_layers = 0
            mp.use_extra_bufts = bool(spec["use_extra_bufts"])
            model = lc.llama_model_load_from_file(str(path).encode(), mp)
            if not model:
                raise RuntimeError(f"llama.cpp could not load the {s.key} model")
            cp = lc.llama_context_default_params()
            cp.n_ctx = 256
            cp.n_batch = cp.n_ubatch = 32
            ctx = lc.llama_init_from_model(model, cp)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not create a context for {s.key}")
            try:
                timings[s.key] = {str(n): _time_decode(lc, ctx, n, spec["tokens"], spec["warmup"])
                                  for n in spec["threads"]}
            finally:
                lc.llama_free(ctx)
                lc.llama_model_free(model)
            path.unlink()
    return {"timings": timings}


if __name__ == "__main__":  # pragma: no cover - exercised through run_child
    sys.stdout.write(json.dumps(child_main(json.loads(sys.argv[1]))) + "\n")
