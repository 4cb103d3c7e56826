"""Does llama.cpp's CPU extra buffer (AMX, CPU_REPACK) work on this machine? A child process finds out.

llama.cpp moves some weight types into extra CPU buffers with their own matmul kernels (see offload/memory.py).
On some machines those kernels take the process down (one AMX VM segfaults at `ldtilecfg` on the first
decode), and a signal cannot be caught in-process. So, the first time a plan would put weights into such a
buffer, a child process (`python -m corral.offload.cpu_probe JOB`) builds a tiny GGUF whose matrices have the
buffer's types, loads it with extra buffers on, decodes a few tokens and prints JSON. A signal, a timeout or
non-finite logits make the verdict "broken"; the plan then loads with `use_extra_bufts = false`.

Verdicts are cached beside the bandwidth cache, keyed on the CPU (model name + flags) and the llama.cpp build
(llama-cpp-python's version and its shared libraries' size and mtime). `CORRAL_CPU_PROBE=off` skips probing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata, util
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from corral.convert.quantize_child import signal_name

from . import memory
from .hardware import Hardware, cache_dir, cpu_info
from .profile import ModelProfile, TensorInfo

T = GGMLQuantizationType
log = logging.getLogger(__name__)  # `corral --debug` shows it: the evidence behind each verdict
PROBE_CACHE_FILE = "cpu_buffers.json"
PROBE_TIMEOUT = 120.0
EXTRA_BUFFERS = ("AMX", "CPU_REPACK")
ENV_SWITCH = "CORRAL_CPU_PROBE"
_BUF_RE = re.compile(r"(\w+) model buffer size\s*=\s*([0-9.]+) MiB")

# The probe model: Llama-shaped, every matrix 256 wide and a multiple of 32 rows (what AMX and the repack
# kernels ask for), one quant type per matrix, cycling through the buffer's types.
_EMBD, _FF, _HEADS, _LAYERS, _VOCAB = 256, 512, 4, 2, 256
_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Verdict:
    """What one child run found about one extra buffer type."""

    buffer: str  # "AMX" | "CPU_REPACK"
    status: str  # "works" | "broken" | "unused" (llama.cpp did not use it here) | "error" (probe failed to run)
    detail: str = ""
    returncode: int | None = None
    signal: str | None = None  # e.g. "SIGSEGV" when the child died of a signal
    buffers: dict[str, int] = field(default_factory=dict)  # model buffers llama.cpp logged (bytes)
    types: tuple[str, ...] = ()  # weight types the probe model used
    system_info: str = ""
    seconds: float = 0.0
    key: str = ""

    @property
    def broken(self) -> bool:
        return self.status == "broken"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["types"] = list(self.types)
        return data

    @staticmethod
    def from_json(data: Any) -> Verdict | None:
        if not isinstance(data, dict):
            return None
        try:
            values = {k: data[k] for k in Verdict.__dataclass_fields__ if k in data}
            values["types"] = tuple(values.get("types", ()))
            verdict = Verdict(**values)
        except TypeError:
            return None
        return verdict if verdict.buffer in EXTRA_BUFFERS and isinstance(verdict.status, str) else None


# ---------------------------------------------------------------- which buffers, which key

def buffers_for_cpu(cpu_flags: Iterable[str]) -> tuple[str, ...]:
    """The extra buffer types llama.cpp has on this CPU (CPU-only load), in its own order."""
    flags = frozenset(cpu_flags)
    out = []
    if memory.has_amx(flags):
        out.append("AMX")
    if memory.repack_types(flags, False):
        out.append("CPU_REPACK")
    return tuple(out)


def probe_types(buffer: str, cpu_flags: Iterable[str]) -> tuple[GGMLQuantizationType, ...]:
    """The weight types a probe model for `buffer` carries (the ones llama.cpp sends there on this CPU)."""
    if buffer == "AMX":
        return tuple(sorted(memory.AMX_TYPES))
    flags = frozenset(cpu_flags)
    # MXFP4 is left out: llama.cpp's quantizer makes it only for MoE experts, which Llama does not have
    return tuple(sorted(t for t in memory.repack_types(flags, False) if t != T.MXFP4))


def llama_build() -> str:
    """llama-cpp-python's version plus the size and mtime of its shared libraries (a rebuild changes them)."""
    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return "no llama-cpp-python"
    parts = [version]
    spec = util.find_spec("llama_cpp")
    if spec and spec.origin:
        lib = Path(spec.origin).parent / "lib"
        for f in sorted(lib.iterdir()) if lib.is_dir() else ():
            if f.is_file() and not f.is_symlink():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return " ".join(parts)


def probe_key(cpu_name: str, cpu_flags: Iterable[str], build: str | None = None) -> str:
    text = "\n".join([cpu_name, " ".join(sorted(cpu_flags)), build if build is not None else llama_build()])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---------------------------------------------------------------- cache

def _cache_file(cache: Path | None) -> Path:
    return (cache or cache_dir()) / PROBE_CACHE_FILE


def cached_verdicts(key: str, *, cache: Path | None = None) -> dict[str, Verdict]:
    try:
        data = json.loads(_cache_file(cache).read_text())
    except (OSError, ValueError):
        return {}
    entry = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        return {}
    out = {}
    for name, raw in entry.items():
        verdict = Verdict.from_json(raw)
        if verdict is not None and verdict.buffer == name:
            out[name] = verdict
    return out


def store_verdict(verdict: Verdict, *, cache: Path | None = None) -> None:
    """Add one verdict to the cache file (atomically; a read-only cache only costs a re-probe)."""
    f = _cache_file(cache)
    try:
        data = json.loads(f.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    entry = data.get(verdict.key)
    entry = entry if isinstance(entry, dict) else {}
    entry[verdict.buffer] = verdict.to_json()
    data[verdict.key] = entry
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=f.parent, delete=False, suffix=".tmp") as fh:
            json.dump(data, fh, indent=1)
        os.replace(fh.name, f)
    except OSError:
        pass


# ---------------------------------------------------------------- running the child

def probe_command(buffer: str, cpu_flags: Iterable[str]) -> list[str]:
    job = {"buffer": buffer, "types": [t.name for t in probe_types(buffer, cpu_flags)]}
    return [sys.executable, "-m", "corral.offload.cpu_probe", json.dumps(job)]


def run_probe(buffer: str, cpu_flags: Iterable[str], *, key: str = "", command: Sequence[str] | None = None,
              timeout: float = PROBE_TIMEOUT) -> Verdict:
    """Run one probe child for `buffer` and judge it (never raises for what the child does)."""
    cmd = list(command) if command is not None else probe_command(buffer, cpu_flags)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": ""}
    start = time.monotonic()
    base = Verdict(buffer, "error", key=key,
                   types=tuple(t.name for t in probe_types(buffer, cpu_flags)) if command is None else ())
    try:
        run = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        log = exc.stderr if isinstance(exc.stderr, str) else (exc.stderr or b"").decode("utf-8", "replace")
        return replace(base, status="broken", detail=f"timed out after {timeout:.0f} s",
                       buffers=parse_buffers(log), seconds=time.monotonic() - start)
    except OSError as exc:
        return replace(base, detail=f"could not start the probe: {exc}", seconds=time.monotonic() - start)
    return judge(base, run.returncode, run.stdout, run.stderr, time.monotonic() - start)


def parse_buffers(log: str) -> dict[str, int]:
    """{buffer name: bytes} from llama.cpp's `<name> model buffer size = X MiB` lines."""
    out: dict[str, int] = {}
    for name, mib in _BUF_RE.findall(log):
        out[name] = out.get(name, 0) + round(float(mib) * memory.MiB)
    return out


def judge(base: Verdict, returncode: int, stdout: str, stderr: str, seconds: float) -> Verdict:
    """The verdict for one finished child: a signal is always 'broken'."""
    v = replace(base, returncode=returncode, buffers=parse_buffers(stderr), seconds=round(seconds, 3))
    if returncode < 0:
        name = signal_name(returncode)
        return replace(v, status="broken", signal=name, detail=f"the test run died of {name}")
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        report = json.loads(last) if last else {}
    except ValueError:
        report = {}
    if returncode != 0 or not isinstance(report, dict) or "finite" not in report:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
        return replace(v, detail=f"the probe could not run: {tail[:300]}")
    v = replace(v, system_info=str(report.get("system_info", "")))
    if base.buffer not in v.buffers:
        return replace(v, status="unused", detail=f"llama.cpp did not use a {base.buffer} buffer here")
    if not report["finite"]:
        return replace(v, status="broken", detail="non-finite logits from the extra buffer's kernels")
    return replace(v, status="works", detail=f"{report.get('tokens', 0)} tokens decoded, logits finite")


def verdict(buffer: str, hw: Hardware, *, cache: Path | None = None, command: Sequence[str] | None = None,
            force: bool = False) -> Verdict:
    """The cached verdict for `buffer` on this machine and build, probing first when there is none."""
    key = probe_key(hw.cpu_name, hw.cpu_flags)
    if not force:
        known = cached_verdicts(key, cache=cache).get(buffer)
        if known is not None:
            log.debug("%s buffer: %s (cached in %s)", buffer, describe(known), _cache_file(cache))
            return known
    log.debug("%s buffer: testing it in a child process", buffer)
    result = run_probe(buffer, hw.cpu_flags, key=key, command=command)
    store_verdict(result, cache=cache)
    log.debug("%s buffer: %s", buffer, describe(result))
    return result


def describe(v: Verdict) -> str:
    """The verdict and its evidence in one line."""
    parts = [v.status, v.detail]
    if v.returncode is not None:
        parts.append(f"child return code {v.returncode}" + (f" ({v.signal})" if v.signal else ""))
    if v.buffers:
        parts.append("llama.cpp's model buffers: " + ", ".join(f"{k} {b:,} B" for k, b in sorted(v.buffers.items())))
    if v.types:
        parts.append("weight types " + " ".join(v.types))
    return "; ".join(p for p in parts if p)


def needed_buffers(hw: Hardware, profile: ModelProfile) -> set[str]:
    """Extra buffers a CPU-only load of this profile would use on this machine (none with a GPU)."""
    tensors: list[TensorInfo] = list(profile.tensors)
    if profile.tie_embeddings:
        tensors += [memory.tied_output(t) for t in profile.tensors if t.kind == "embd"]
    return memory.extra_buffers_used(tensors, hw.cpu_flags, bool(hw.gpus), hw.absent_cpu_buffers)


def check_extra_buffers(hw: Hardware, profile: ModelProfile, *, cache: Path | None = None,
                        command: Sequence[str] | None = None) -> Hardware:
    """`hw` with the verdicts on the extra buffers this model would use: broken ones in broken_cpu_buffers,
    ones llama.cpp does not create here in absent_cpu_buffers (their weights then fall to the next buffer,
    which is checked in turn)."""
    if os.environ.get(ENV_SWITCH, "").lower() in ("off", "0", "no"):
        return hw
    seen: set[str] = set()
    while todo := sorted(needed_buffers(hw, profile) - seen):
        for b in todo:
            seen.add(b)
            v = verdict(b, hw, cache=cache, command=command)
            if v.broken:
                hw = replace(hw, broken_cpu_buffers=hw.broken_cpu_buffers | {b})
            elif v.status == "unused":
                hw = replace(hw, absent_cpu_buffers=hw.absent_cpu_buffers | {b})
    return hw


def broken_on_this_cpu(profile: ModelProfile, *, cache: Path | None = None,
                       command: Sequence[str] | None = None) -> frozenset[str]:
    """The extra buffers a CPU-only load of `profile` would use on this machine that the probe finds broken
    (probing what is not cached): the check for a plan made for other hardware (a file, a what-if, a test)."""
    flags, name = cpu_info()
    here = Hardware(cpu_flags=flags, cpu_name=name, source="this CPU")
    return check_extra_buffers(here, profile, cache=cache, command=command).broken_cpu_buffers


def machine_verdicts(hw: Hardware, *, cache: Path | None = None, probe: bool = True,
                     force: bool = False) -> list[Verdict]:
    """Verdicts for every extra buffer this CPU has (probing what is not cached when `probe`)."""
    key = probe_key(hw.cpu_name, hw.cpu_flags)
    known = cached_verdicts(key, cache=cache)
    out = []
    for b in buffers_for_cpu(hw.cpu_flags):
        if probe and (force or b not in known):
            out.append(verdict(b, hw, cache=cache, force=True))
        elif b in known:
            out.append(known[b])
    return out


# ---------------------------------------------------------------- the child

def probe_model(path: Path, types: Sequence[GGMLQuantizationType]) -> Path:
    """Write a tiny Llama GGUF (no vocabulary, random weights) whose matrices cycle through `types`."""
    import numpy as np
    from gguf import GGUFValueType, Keys

    from corral.convert.gguf_writer import build_header, pad_to
    from corral.convert.stream_quantize import quantize_rows
    from corral.convert.tensor_specs import TensorSpec

    rng = np.random.default_rng(0)
    head = _EMBD // _HEADS
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (_EMBD, _VOCAB))]
    for i in range(_LAYERS):
        shapes += [(f"blk.{i}.attn_norm.weight", (_EMBD,)), (f"blk.{i}.attn_q.weight", (_EMBD, _EMBD)),
                   (f"blk.{i}.attn_k.weight", (_EMBD, _EMBD)), (f"blk.{i}.attn_v.weight", (_EMBD, _EMBD)),
                   (f"blk.{i}.attn_output.weight", (_EMBD, _EMBD)), (f"blk.{i}.ffn_norm.weight", (_EMBD,)),
                   (f"blk.{i}.ffn_gate.weight", (_EMBD, _FF)), (f"blk.{i}.ffn_up.weight", (_EMBD, _FF)),
                   (f"blk.{i}.ffn_down.weight", (_FF, _EMBD))]
    shapes += [("output_norm.weight", (_EMBD,)), ("output.weight", (_EMBD, _VOCAB))]
    specs, blobs, n = [], [], 0
    for name, shape in shapes:
        values = (np.ones(shape[::-1], dtype=np.float32) if len(shape) == 1
                  else rng.standard_normal(shape[::-1]).astype(np.float32) * 0.05)
        if len(shape) == 1 or name == "token_embd.weight":
            specs.append(TensorSpec(name, shape, T.F32))
            blobs.append(values.tobytes())
            continue
        qtype = types[n % len(types)]
        n += 1
        specs.append(TensorSpec(name, shape, qtype))
        blobs.append(quantize_rows(values, qtype).tobytes())
    u32, f32, s_ = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    kvs = [(Keys.General.ARCHITECTURE, "llama", s_), (Keys.General.NAME, "corral-cpu-probe", s_),
           ("llama.block_count", _LAYERS, u32), ("llama.context_length", 512, u32),
           ("llama.embedding_length", _EMBD, u32), ("llama.feed_forward_length", _FF, u32),
           ("llama.attention.head_count", _HEADS, u32), ("llama.attention.head_count_kv", _HEADS, u32),
           ("llama.rope.freq_base", 10000.0, f32), ("llama.attention.layer_norm_rms_epsilon", 1e-5, f32),
           ("llama.rope.dimension_count", head, u32), ("llama.vocab_size", _VOCAB, u32),
           (Keys.Tokenizer.MODEL, "no_vocab", s_)]
    with open(path, "wb") as fh:
        fh.write(build_header(kvs, specs))
        for spec, blob in zip(specs, blobs):
            if len(blob) != spec.nbytes:
                raise AssertionError(f"{spec.name}: {len(blob)} bytes, expected {spec.nbytes}")
            fh.write(blob + b"\0" * (pad_to(len(blob)) - len(blob)))
    return path


def child_main(job: dict[str, Any]) -> dict[str, Any]:
    """Load the probe model with extra buffers on and decode a few tokens; llama.cpp's log goes to stderr."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        sys.stderr.write(text.decode("utf-8", "replace"))
        sys.stderr.flush()

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    system_info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    with tempfile.TemporaryDirectory(prefix="corral-probe-") as tmp:
        path = probe_model(Path(tmp) / "probe.gguf", [T[name] for name in job["types"]])
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise RuntimeError("llama.cpp could not load the probe model")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = 256, 64, 64
        cp.n_threads = cp.n_threads_batch = max(1, min(4, os.cpu_count() or 1))
        ctx = llama_cpp.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context for the probe model")
        finite, n_tokens = True, 0
        prompt = [1, 7, 42, 99, 200, 3, 17, 64]  # a prompt batch, then single-token decodes
        steps = [prompt] + [[t] for t in (5, 9, 11, 13)]
        for tokens in steps:
            arr = (llama_cpp.llama_token * len(tokens))(*tokens)
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) != 0:
                raise RuntimeError("llama_decode failed on the probe model")
            logits = llama_cpp.llama_get_logits_ith(ctx, -1)
            finite = finite and all(math.isfinite(logits[i]) for i in range(_VOCAB))
            n_tokens += len(tokens)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return {"finite": finite, "tokens": n_tokens, "system_info": system_info}


if __name__ == "__main__":  # pragma: no cover - exercised through run_probe
    print(json.dumps(child_main(json.loads(sys.argv[1]))), flush=True)
