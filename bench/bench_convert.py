"""Conversion speed and peak memory: corral vs llama.cpp's convert_hf_to_gguf.py, same input, same run.

    python -m bench.bench_convert [--workdir /tmp/corral-bench] [--quick] [--outtypes bf16,q8_0]

Builds (once, cached in --workdir, never in the repo) a ~3 GB BF16 checkpoint with the real Llama 3
vocabulary (hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192) plus a ~130 MB one, reads the
source files before each run so both tools start from a warm page cache, then runs each converter
under GNU time and records wall time and peak RSS (the kernel's high-water mark, file-backed pages
included). The two
tools alternate; outputs are compared byte for byte after the tensor data start (provenance keys
such as general.name differ). `--quick` uses only the small checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.convert.minimodel import MiniSpec, build_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIG = MiniSpec(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192, shards=2)
SMALL = MiniSpec()


@dataclass(frozen=True)
class Run:
    model: str
    tool: str
    outtype: str
    seconds: float
    peak_rss_mib: float
    out_bytes: int


def _ref_converter() -> Path:
    for c in (os.environ.get("CORRAL_REF_CONVERTER", ""),
              str(REPO / ".venv/reference/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py")):
        if c and Path(c).is_file():
            return Path(c)
    raise SystemExit("llama.cpp's convert_hf_to_gguf.py not found: set CORRAL_REF_CONVERTER or run `make venv`")


def _measure(cmd: list[str], workdir: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a command, via GNU time (its own small process forks the
    command, so the child's RSS high-water mark does not inherit this script's memory)."""
    report = workdir / "time.txt"
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-o", str(report), "-f", "%M", *cmd],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds, int(report.read_text().split()[-1]) / 1024  # KiB -> MiB


def _warm(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _same_tensor_data(a: Path, b: Path) -> bool:
    from gguf import GGUFReader

    ra, rb = GGUFReader(a), GGUFReader(b)
    ta, tb = ra.tensors, rb.tensors
    if [(t.name, t.tensor_type, tuple(t.shape)) for t in ta] != [(t.name, t.tensor_type, tuple(t.shape)) for t in tb]:
        return False
    start_a, start_b = ta[0].data_offset, tb[0].data_offset
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(start_a)
        fb.seek(start_b)
        while True:
            x, y = fa.read(64 << 20), fb.read(64 << 20)
            if x != y:
                return False
            if not x:
                return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/corral-bench"))
    ap.add_argument("--quick", action="store_true", help="only the small checkpoint")
    ap.add_argument("--outtypes", default="bf16,q8_0")
    ap.add_argument("--json", type=Path, help="also write the runs as JSON here")
    args = ap.parse_args()
    ref = _ref_converter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = {"small-130MB": SMALL} if args.quick else {"small-130MB": SMALL, "big-3GB": BIG}
    runs: list[Run] = []
    for label, spec in models.items():
        src = args.workdir / label
        if not (src / "config.json").is_file():
            print(f"building {label} checkpoint in {src} ...", file=sys.stderr)
            build_checkpoint(src, spec, seed=0)
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"{label}: {src_bytes / 1e9:.2f} GB of safetensors", file=sys.stderr)
        for outtype in args.outtypes.split(","):
            outs = {}
            for tool in ("llama.cpp", "corral"):
                out = args.workdir / f"{label}-{tool}-{outtype}.gguf"
                out.unlink(missing_ok=True)
                _warm(src)
                if tool == "corral":
                    cmd = [sys.executable, "-c", "from corral.app.cli.main import main; main()", "convert", str(src),
                           "-o", str(out), "--outtype", outtype, "--quiet"]
                else:
                    cmd = [sys.executable, str(ref), str(src), "--outfile", str(out), "--outtype", outtype]
                seconds, rss = _measure(cmd, args.workdir)
                runs.append(Run(label, tool, outtype, seconds, rss, out.stat().st_size))
                outs[tool] = out
                print(f"  {tool:9s} {outtype:5s} {seconds:7.1f} s  peak RSS {rss:7.0f} MiB", file=sys.stderr)
            same = _same_tensor_data(outs["corral"], outs["llama.cpp"])
            print(f"  tensor data identical: {same}", file=sys.stderr)
            for out in outs.values():
                out.unlink()
            if not same:
                raise SystemExit("outputs differ")
    print("| model | outtype | llama.cpp s | corral s | time ratio | llama.cpp peak RSS | corral peak RSS | RSS ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label in models:
        for outtype in args.outtypes.split(","):
            r = next(x for x in runs if (x.model, x.tool, x.outtype) == (label, "llama.cpp", outtype))
            c = next(x for x in runs if (x.model, x.tool, x.outtype) == (label, "corral", outtype))
            print(f"| {label} | {outtype} | {r.seconds:.1f} | {c.seconds:.1f} | {c.seconds / r.seconds:.2f}x | "
                  f"{r.peak_rss_mib:.0f} MiB | {c.peak_rss_mib:.0f} MiB | {c.peak_rss_mib / r.peak_rss_mib:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))


if __name__ == "__main__":
    main()
