"""Run every benchmark in turn (`make bench`); each prints its table and writes bench/out/<name>.json."""

from __future__ import annotations

import runpy
import sys
import time

BENCHES = ["bench_convert", "bench_quantize", "bench_plan", "bench_speed", "bench_ask", "bench_chat", "bench_latency", "bench_resume", "bench_speculative", "bench_spec_streamed", "bench_streaming", "bench_rpc", "bench_quality"]


def main() -> int:
    failed = []
    for name in BENCHES:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            runpy.run_module(f"bench.{name}", run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (None, 0):
                failed.append(name)
        except Exception as exc:  # report and go on with the next benchmark
            print(f"{name} failed: {exc!r}", file=sys.stderr)
            failed.append(name)
        print(f"== {name} took {time.perf_counter() - start:.1f} s", flush=True)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
