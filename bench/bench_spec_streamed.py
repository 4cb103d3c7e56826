"""Speculative decoding on a target that streams from disk: tok/s with and without a draft, inside a memory cgroup.

    python -m bench.bench_spec_streamed [--limit MIB] [--tokens N] [--threads N] [--prompts N]

The target is the trained `base-huge` (the trained `base` plus 40 inert layers with FFN 16384, 1.2 GiB F16: the
same function as `base`, a heavy pass per token); the drafts are the
trained `small` (a smaller model trained on the same text) and the trained `base` at Q8_0 (the target's own
function, quantized: the most agreeing draft there can be). Each run is a child process in a cgroup-v1 memory
cgroup of `--limit` MiB, so `corral`'s plan streams the part of the target that does not fit, as it would for a
405B on a desktop; the file is evicted from the page cache before each run. Every run is greedy and checked to
give the plain run's tokens. As root only (skipped with a reason elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_speculative import held_out_prompts
from bench.bench_streaming import GiB, _Clock, child_setup, evict, memory_cgroup, skip_reason

MiB = 1024**2
OUT = Path(__file__).resolve().parent / "out" / "bench_spec_streamed.json"


def _paths(target: str, drafts: list[str], folder: Path) -> dict[str, Path]:
    """The target's and the drafts' files; `other` (random weights in `small`'s shape) is written into `folder`."""
    from tests.helpers.trained import MODELS, trained_gguf

    paths = {"target": trained_gguf(target, "f16")}
    for name in drafts:
        if name == "other":
            from corral.convert.converter import convert_checkpoint
            from corral.convert.minimodel import build_checkpoint

            ckpt = build_checkpoint(folder / "other-ckpt", MODELS["small"].shape.mini_spec(), seed=7)
            paths[name] = folder / "other-f16.gguf"
            convert_checkpoint(ckpt, paths[name], outtype="f16", force=True)
        elif name.endswith("-q8"):
            paths[name] = trained_gguf(name[:-3], "q8_0")
        else:
            paths[name] = trained_gguf(name, "f16")
    return paths


def child(target: Path, draft: str, draft_path: Path | None, prompt: int, tokens: int, threads: int,
          draft_max: int) -> dict[str, Any]:
    """One greedy continuation with the target loaded by corral (streaming as its plan says). The paths come from
    the parent: resolving them imports the training helpers (torch), whose memory would count in the cgroup."""
    from corral.app.runtime.api import SamplingSettings
    from corral.app.runtime.engine import load_engine
    from corral.app.runtime.setup import EngineOptions
    from corral.offload.memlimit import cgroup_memory_limit

    options = EngineOptions(n_ctx=1024, n_threads=threads, force=True, draft_max=draft_max,
                            draft=str(draft_path) if draft_path is not None else None)
    engine = load_engine(target, options)
    clock = _Clock()
    g = engine.complete(held_out_prompts(prompt + 1)[prompt], SamplingSettings(temperature=0.0, max_tokens=tokens),
                        on_text=clock)
    streamer = engine.streamer
    group = cgroup_memory_limit()
    out = {"draft": draft, "tps": g.stats.tokens_per_second, "tokens": list(engine.last_completion_tokens),
           "drafted": g.stats.drafted_tokens, "accepted": g.stats.accepted_tokens,
           "read_per_token": (clock.last[1] - clock.first[1]) / max(1, g.stats.completion_tokens - 1)
           if clock.first else 0, "streaming": streamer.describe() if streamer is not None else None,
           "anon": group.anon if group else 0, "plan_tps": engine.plan.tokens_per_second if engine.plan else None}
    engine.close()
    return out


def run_child(args: argparse.Namespace, paths: dict[str, Path], draft: str, prompt: int,
              cgroup: Path) -> dict[str, Any]:
    for path in paths.values():
        evict(path)
    cmd = [sys.executable, "-m", "bench.bench_spec_streamed", "--child", draft, "--target", str(paths["target"]),
           "--draft-path", str(paths.get(draft, "")), "--prompt", str(prompt),
           "--tokens", str(args.tokens), "--threads", str(args.threads), "--draft-max", str(args.draft_max)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, preexec_fn=child_setup(cgroup), timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{draft} child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--draft-path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=800, help="the cgroup's memory limit in MiB")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--drafts", default="small,medium,base-q8,other",
                    help="trained models (NAME, or NAME-q8 for its Q8_0), 'other' for random weights")
    ap.add_argument("--target-model", default="base-huge", help="the padded trained target (base-huge or base-large)")
    args = ap.parse_args(argv)
    if args.child:
        draft_path = Path(args.draft_path) if args.draft_path else None
        print(json.dumps(child(args.target, args.child, draft_path, args.prompt, args.tokens, args.threads,
                               args.draft_max)))
        return 0
    why = skip_reason()
    if why:
        print(f"bench_spec_streamed skipped: {why}")
        return 0
    drafts = args.drafts.split(",")
    with tempfile.TemporaryDirectory(prefix="corral-spec-stream-") as tmp:
        paths = _paths(args.target_model, drafts, Path(tmp))
        sizes = ", ".join(f"{k} {p.stat().st_size / MiB:.0f} MiB" for k, p in paths.items())
        print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads; {sizes}; target "
              f"{args.target_model}; cgroup limit {args.limit} MiB, {args.tokens} tokens", file=sys.stderr)
        rows = _run(args, paths, drafts)
    _table(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"limit_mib": args.limit, "tokens": args.tokens, "threads": args.threads,
                               "target": args.target_model, "runs": [
                                   {"prompt": p, "draft": d, "plain": plain, "drafted": res, "acceptance": rate,
                                    "same_tokens": same} for p, d, plain, res, rate, same in rows]}, indent=1))
    return 0


def _run(args: argparse.Namespace, paths: dict[str, Path], drafts: list[str]) -> list[tuple[Any, ...]]:
    rows = []
    with memory_cgroup(args.limit * MiB) as cg:
        for prompt in range(args.prompts):
            plain = run_child(args, paths, "none", prompt, cg)
            streamed = (plain["streaming"] or {}).get("streamed_bytes", 0)
            print(f"prompt {prompt}: plain {plain['tps']:.3f} tok/s, {plain['read_per_token'] / GiB:.3f} GiB/token, "
                  f"streams {streamed / MiB:.0f} MiB", file=sys.stderr)
            for draft in drafts:
                res = run_child(args, paths, draft, prompt, cg)
                rate = res["accepted"] / res["drafted"] if res["drafted"] else 0.0
                same = res["tokens"] == plain["tokens"]
                print(f"prompt {prompt}: {draft} {res['tps']:.3f} tok/s ({res['tps'] / plain['tps']:.2f}x), "
                      f"accepted {rate:.0%}, same tokens {same}", file=sys.stderr)
                rows.append((prompt, draft, plain, res, rate, same))
    return rows


def _table(rows: list[tuple[Any, ...]]) -> None:
    print("\n| prompt | draft | plain tok/s | plain GiB read/token | streamed MiB | with draft tok/s | speed-up | "
          "accepted | GiB read/token | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for prompt, draft, plain, res, rate, same in rows:
        streamed = (plain["streaming"] or {}).get("streamed_bytes", 0)
        print(f"| {prompt} | {draft} | {plain['tps']:.3f} | {plain['read_per_token'] / GiB:.3f} | {streamed / MiB:.0f} | "
              f"{res['tps']:.3f} | {res['tps'] / plain['tps']:.2f}x | {rate:.0%} | {res['read_per_token'] / GiB:.3f} "
              f"| {same} |")


if __name__ == "__main__":
    sys.exit(main())
