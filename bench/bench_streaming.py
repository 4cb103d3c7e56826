"""Models larger than memory: corral's streaming engine against raw llama-cpp-python mmap, inside a memory cgroup.

    python -m bench.bench_streaming [--model FILE.gguf] [--ratios 1.3,2,3] [--tokens N] [--threads N]

Builds (or takes) an F16 miniature Llama of ~1.2 GB, then for each file/limit ratio runs each side in a
child process placed in a cgroup-v1 memory cgroup (`memory.limit_in_bytes`, as root; skipped with a
reason elsewhere), with the file evicted from the page cache first (`posix_fadvise(DONTNEED)`). Reported:
decode tok/s, GiB read from disk per token (the child's /proc/self/io `read_bytes`), and the bound
max(compute time, bytes that cannot stay cached / measured cold read speed) per token (bound/raw: the most any
engine could gain over plain mmap at that ratio), and whether corral's greedy text is the one it writes with the
model in RAM (not streaming). Children run in their own session with autogroup nice -15 (the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
PROMPT = "Once upon a time, in a valley where the llamas roam, there"
GiB = 1024**3


def skip_reason() -> str | None:
    """Why this benchmark cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root to create a memory cgroup"
    if not (CGROUP_V1 / "memory.limit_in_bytes").is_file():
        return "no cgroup-v1 memory controller at /sys/fs/cgroup/memory"
    return None


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A fresh cgroup-v1 memory cgroup with `limit` bytes, removed afterwards."""
    cg = CGROUP_V1 / f"corral-bench-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        yield cg
    finally:
        for _ in range(100):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_read_speed(path: Path) -> float:
    """Bytes/s of a cold read of the whole file as the streaming engine reads (4 MiB requests, see
    `offload.bandwidth.timed_cold_read`): what the disk gives with no compute beside it. The whole file, not a
    prefix: this VM's virtual disk is cached by its host, and a prefix read again reads faster."""
    from corral.offload.bandwidth import timed_cold_read

    evict(path)
    speed = timed_cold_read(path, path.stat().st_size, seconds=600.0)
    evict(path)
    if not speed:
        raise RuntimeError(f"could not read {path}")
    return speed


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


class _Clock:
    """Timestamps and read_bytes at the first and last generated piece."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] = (0.0, 0)
        self.pieces: list[str] = []

    def __call__(self, piece: str) -> None:
        now = (time.perf_counter(), read_bytes())
        if self.first is None:
            self.first = now
        self.last = now
        self.pieces.append(piece)


def child(mode: str, path: Path, tokens: int, threads: int) -> dict[str, Any]:
    """Generate `tokens` greedily; per-token numbers exclude the prompt and the first token."""
    clock = _Clock()
    t_load = time.perf_counter()
    if mode == "raw":
        from llama_cpp import Llama
        from llama_cpp import llama_cpp as lc

        default_params = lc.llama_model_default_params

        # extra buffers off, as `llama-cli --no-repack`: on AMX hosts llama.cpp otherwise copies F16 matrices
        # into its AMX buffer, anonymous memory that cannot stream (the child is OOM-killed in the group);
        # elsewhere F16 has no extra buffer and nothing changes
        def plain_mmap_params() -> Any:
            params = default_params()
            params.use_extra_bufts = False
            return params

        lc.llama_model_default_params = plain_mmap_params
        llm = Llama(model_path=str(path), n_ctx=512, n_batch=64, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
        load_s = time.perf_counter() - t_load
        n = 0
        for chunk in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, stream=True):
            clock(chunk["choices"][0]["text"])
            n += 1
        extra: dict[str, Any] = {}
    else:
        from corral.app.runtime.api import SamplingSettings
        from corral.app.runtime.engine import load_engine
        from corral.app.runtime.setup import EngineOptions

        engine = load_engine(path, EngineOptions(n_ctx=512, n_threads=threads, force=True))
        load_s = time.perf_counter() - t_load
        g = engine.complete(PROMPT, SamplingSettings(temperature=0.0, max_tokens=tokens), on_text=clock)
        n = g.stats.completion_tokens
        streamer = getattr(engine, "streamer", None)
        from corral.offload.memlimit import cgroup_memory_limit

        group = cgroup_memory_limit()
        extra = {"anon": group.anon if group else 0,"streaming": streamer.describe() if streamer is not None else None,
                 "disk_stream_bytes": engine.plan.disk_stream_bytes if engine.plan else None,
                 "plan_tps": engine.plan.tokens_per_second if engine.plan else None}
        engine.close()
    assert clock.first is not None
    steps = max(1, len(clock.pieces) - 1)
    dt = clock.last[0] - clock.first[0]
    return {"mode": mode, "tokens": n, "load_s": load_s, "tps": steps / dt if dt > 0 else 0.0,
            "read_per_token": (clock.last[1] - clock.first[1]) / steps, "text": "".join(clock.pieces), **extra}


def child_setup(cgroup: Path | None) -> Callable[[], None]:
    """preexec_fn for a measured child: its own session, autogroup nice -15 (the machine is shared), in `cgroup`."""
    def enter() -> None:
        os.setsid()
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text("-15")
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return enter


# sides beyond raw and corral: corral with one of its measured choices undone (the ablations in BENCHMARKS.md)
ABLATIONS = {"corral-128k": {"CORRAL_STREAM_HUGEPAGE": "0"}, "corral-w64": {"CORRAL_STREAM_WINDOW_SHARE": "0"},
             "corral-ra": {"CORRAL_STREAM_RANDOM": "0"}, "corral-whole": {"CORRAL_STREAM_SLICE": "0"}}


def run_child(side: str, path: Path, tokens: int, threads: int, cgroup: Path | None) -> dict[str, Any]:
    evict(path)
    mode = "raw" if side == "raw" else "corral"
    cmd = [sys.executable, "-m", "bench.bench_streaming", "--child", mode, "--model", str(path),
           "--tokens", str(tokens), "--threads", str(threads)]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **ABLATIONS.get(side, {})}
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, preexec_fn=child_setup(cgroup), timeout=900,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{side} child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median tok/s (the lower middle one of an even count), its read per token the median of
    all; `text` the same in every run or the word "differs" (a run that changed tokens must show)."""
    ordered = sorted(runs, key=lambda r: r["tps"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    reads = sorted(r["read_per_token"] for r in runs)
    mid["read_per_token"] = reads[(len(reads) - 1) // 2]
    if any(r["text"] != mid["text"] for r in runs):
        mid["text"] = "differs"
    mid["runs"] = [r["tps"] for r in runs]
    return mid


def build_model(folder: Path) -> Path:
    from corral.convert.converter import convert_checkpoint
    from corral.convert.minimodel import MiniSpec, build_checkpoint

    spec = MiniSpec(n_embd=1024, n_layer=24, n_head=16, n_head_kv=4, n_ff=4096, shards=2)
    ckpt = build_checkpoint(folder / "ckpt", spec, seed=0)
    out = folder / "stream-f16.gguf"
    convert_checkpoint(ckpt, out, outtype="f16", force=True)
    for f in ckpt.iterdir():
        f.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["raw", "corral"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help="an existing GGUF (default: build a ~1.2 GB F16 miniature)")
    ap.add_argument("--ratios", default="1.3,2,3", help="file size / memory limit ratios")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each side per ratio, alternating (medians reported)")
    ap.add_argument("--sides", default="raw,corral",
                    help="raw, corral and/or an ablation: " + ", ".join(f"{k} ({v})" for k, v in ABLATIONS.items()))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.tokens, args.threads)))
        return 0
    why = skip_reason()
    if why:
        print(f"bench_streaming skipped: {why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="corral-bench-stream-") as tmp:
        path = args.model or build_model(Path(tmp))
        size = path.stat().st_size
        speed = cold_read_speed(path)
        full = run_child("raw", path, args.tokens, args.threads, None)  # in RAM: the compute time
        compute_s = 1.0 / full["tps"]
        # corral in RAM, not streaming: the tokens streaming must not change (raw llama-cpp-python's own settings
        # differ in the last bits of the logits, which a random-weight model's near-ties turn into other tokens)
        in_ram = run_child("corral", path, args.tokens, args.threads, None)
        if in_ram.get("streaming") is not None:
            raise RuntimeError("the model streams even without a memory limit: use a smaller --model")
        print(f"file {size / GiB:.2f} GiB, cold read {speed / 1e9:.2f} GB/s, in RAM {full['tps']:.2f} tok/s "
              f"({args.threads} threads)", file=sys.stderr)
        rows = []
        speeds = [speed]
        for ratio in (float(r) for r in args.ratios.split(",")):
            limit = int(size / ratio)
            runs: dict[str, list[dict[str, Any]]] = {}
            with memory_cgroup(limit) as cg:
                for _ in range(args.repeat):  # sides alternate: the disk's speed drifts over minutes
                    for side in args.sides.split(","):
                        r = run_child(side, path, args.tokens, args.threads, cg)
                        runs.setdefault(side, []).append(r)
                        streams = (r.get("streaming") or {}).get("streamed_bytes")
                        print(f"ratio {ratio}: {side} {r['tps']:.3f} tok/s, {r['read_per_token'] / GiB:.3f} GiB/token"
                              + (f" ({streams / GiB:.3f} GiB streamed)" if streams else ""), file=sys.stderr)
            res = {side: median_run(rs) for side, rs in runs.items()}
            speeds.append(cold_read_speed(path))  # the disk's speed varies with its host: measured after each pair
            rows.append((ratio, limit, res))
        # the bound is an upper limit: the fastest cold read this run saw
        speed = max(speeds)
        print(f"\nfile {path.name} {size / GiB:.2f} GiB, cold reads {' '.join(f'{s / 1e9:.2f}' for s in speeds)} GB/s "
              f"(bound from the fastest), fully cached {full['tps']:.2f} tok/s, {args.threads} threads, "
              f"{args.tokens} tokens per run\n")
        print("| file/limit | limit | raw mmap tok/s | raw GiB read/token | corral tok/s | corral GiB read/token | "
              "corral/raw | bound tok/s | bound/raw | corral/bound | plan tok/s | same text as in RAM |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for ratio, limit, res in rows:
            raw, ours = res.get("raw"), res.get("corral")
            streamed = (ours or {}).get("streaming") or {}
            per_token = streamed.get("resident_bytes", 0) + streamed.get("streamed_bytes", size)
            miss = max(0, per_token - (limit - (ours or {}).get("anon", 0)))  # all the room not anonymous
            bound = 1.0 / max(compute_s, miss / speed)
            cells = [f"{ratio:g}", f"{limit / GiB:.2f} GiB"]
            for side in (raw, ours):
                cells += [f"{side['tps']:.3f}", f"{side['read_per_token'] / GiB:.3f}"] if side else ["-", "-"]
            cells.append(f"{ours['tps'] / raw['tps']:.2f}x" if raw and ours else "-")
            # bound/raw: the most any engine can gain over plain mmap here (2x needs 2 / (bound/raw) of the bound)
            cells += [f"{bound:.3f}", f"{bound / raw['tps']:.2f}x" if raw else "-",
                      f"{ours['tps'] / bound:.0%}" if ours else "-"]
            cells.append(f"{ours['plan_tps']:.3f}" if ours and ours.get("plan_tps") else "-")
            cells.append(str(ours["text"] == in_ram["text"]) if ours else "-")
            print("| " + " | ".join(cells) + " |")
        if args.repeat > 1:
            print("\nEvery run, tok/s: " + "; ".join(
                f"{ratio:g} " + ", ".join(f"{side} " + " ".join(f"{t:.2f}" for t in r["runs"]) for side, r in res.items())
                for ratio, _limit, res in rows))
        extra = [side for side in args.sides.split(",") if side in ABLATIONS]
        if extra:
            print("\n| file/limit | " + " | ".join(f"{side} tok/s | {side} GiB read/token | corral/{side}"
                                                 for side in extra) + " |")
            print("|---|" + "---|---|---|" * len(extra))
            for ratio, _limit, res in rows:
                cells = [f"{ratio:g}"]
                for side in extra:
                    r, ours = res[side], res.get("corral")
                    cells += [f"{r['tps']:.3f}", f"{r['read_per_token'] / GiB:.3f}",
                              f"{ours['tps'] / r['tps']:.2f}x" if ours else "-"]
                print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
