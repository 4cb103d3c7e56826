"""Latency goals that unit tests only guard loosely: each is timed here against its goal, best of N runs.

    python -m bench.bench_latency [--repeat N]

Planning the 405B catalog model, measuring RAM/disk bandwidth, the chat-template guards stopping explosive
templates, the template clock stopping an endless loop, and `corral ask` stopping on Ctrl-C mid-reply.
Prints a markdown table, writes bench/out/bench_latency.json, and exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def plan_405b() -> None:
    from corral.offload.api import PlanOptions, plan_model
    from corral.offload.hardware import GPU, Hardware

    gib = 1024**3
    hw = Hardware(gpus=(GPU(0, "RTX 4090", 24 * gib, 24 * gib),), ram_total=128 * gib, ram_available=120 * gib)
    plan_model("llama-3.1-405b-instruct", PlanOptions(quant="IQ2_XXS"), hw)


def bandwidth(folder: Path) -> None:
    from corral.offload.hardware import measure_bandwidth

    measure_bandwidth(folder, cache=folder / "cache", force=True)


def _chat() -> list:
    from corral.app.runtime.api import Message

    return [Message("system", "Be brief."), Message("user", "Hi there"), Message("assistant", "Hello!")]


def template_guard(source: str) -> None:
    """Render one explosive template; it must be stopped by its guard (the clock gets 30 s, so it cannot)."""
    from corral.app.runtime.chat_format import ChatTemplate, TemplateLimits
    from corral.convert.errors import TemplateError

    try:
        ChatTemplate(source, TemplateLimits(max_seconds=30.0)).render(_chat(), bos_token="<|begin_of_text|>",
                                                                      eos_token="<|eot_id|>")
    except TemplateError as exc:
        assert "longer than" not in str(exc), exc
    else:
        raise AssertionError("an explosive template rendered")


def template_clock() -> None:
    from corral.app.runtime.chat_format import ChatTemplate, TemplateLimits
    from corral.convert.errors import TemplateError

    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    try:
        ChatTemplate(looping, TemplateLimits(max_seconds=0.3)).render(_chat(), bos_token="", eos_token="")
    except TemplateError:
        return
    raise AssertionError("the loop ran to the end")


def ask_interrupt(model: Path) -> float:
    """Seconds from SIGINT (sent once the reply streams) to `corral ask` exiting 130."""
    cmd = [sys.executable, "-m", "corral.app.cli.main", "ask", "-m", str(model), "Tell me everything.",
           "--temperature", "0", "--max-tokens", "0", "--ctx", "8192", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    got = b""
    while len(got) < 40:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            proc.kill()
            raise RuntimeError("the reply never started streaming")
        got += chunk
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    took = time.perf_counter() - sent
    if proc.returncode != 130:
        raise RuntimeError(f"corral ask exited {proc.returncode}, not 130")
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-latency-") as tmp:
        folder = Path(tmp)
        plan_405b()  # imports and caches warm
        rows.append(("plan llama-3.1-405b-instruct IQ2_XXS (catalog, no file)", _best(plan_405b, args.repeat), 1.0))
        rows.append(("measure RAM + disk bandwidth (uncached)", _best(lambda: bandwidth(folder), args.repeat), 4.0))
        from tests.helpers.templates import EXPLOSIONS

        guard = {name: _best(lambda src=src: template_guard(src), args.repeat) for name, src in EXPLOSIONS.items()}
        slowest = max(guard, key=guard.__getitem__)
        rows.append((f"explosive chat template stopped by its guard: slowest of {len(guard)} ({slowest})",
                     guard[slowest], 1.5))
        rows.append(("endless template loop, 0.3 s budget", _best(template_clock, args.repeat), 2.0))
        from tests.helpers.engine import write_tiny_gguf

        tiny = write_tiny_gguf(folder / "tiny.gguf")
        rows.append(("`corral ask` Ctrl-C mid-reply to exit 130 (tiny model)",
                     min(ask_interrupt(tiny) for _ in range(args.repeat)), 5.0))
    print(f"Best of {args.repeat} runs.\n")
    print("| what | seconds | goal (s) | met |\n|---|---|---|---|")
    for what, seconds, goal in rows:
        print(f"| {what} | {seconds:.3f} | < {goal:g} | {'yes' if seconds < goal else 'NO'} |")
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_latency.json").write_text(json.dumps([{"what": w, "seconds": s, "goal": g} for w, s, g in rows],
                                                      indent=1))
    return 0 if all(s < g for _, s, g in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
