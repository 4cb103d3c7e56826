"""A client of RPC workers in its own process (ggml's device registry is process-wide): prints JSON.

    python -m tests.helpers.rpc_client probe HOST:PORT [--no-link]
    python -m tests.helpers.rpc_client generate MODEL.gguf PROMPT [--rpc HOST:PORT ...] [--max-tokens N]
        [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict


def _probe(endpoint: str, link: bool) -> dict[str, object]:
    from corral.app.runtime import rpc

    return asdict(rpc.probe(endpoint, measure_link=link))


def _generate(model: str, prompt: str, endpoints: list[str], max_tokens: int, threads: int) -> dict[str, object]:
    from corral.app.runtime import rpc
    from corral.app.runtime.api import Message, SamplingSettings
    from corral.app.runtime.engine import EngineOptions, load_engine
    from tests.helpers.engine import cpu_plan

    names: list[str] = []
    for endpoint in endpoints:
        names.extend(rpc.add_server(endpoint))
    changes = dict(rpc_servers=tuple(endpoints), devices=tuple(names), tensor_split=(1.0,) * len(names),
                   n_gpu_layers=-1) if endpoints else {}
    plan = cpu_plan(n_threads=threads, n_threads_batch=threads, **changes)
    start = time.perf_counter()
    engine = load_engine(model, EngineOptions(), plan=plan)
    loaded = time.perf_counter() - start
    try:
        generation = engine.generate([Message("user", prompt)],
                                     SamplingSettings(temperature=0.0, max_tokens=max_tokens))
        buffers = [line.strip() for line in engine.load_log if "buffer size" in line]
        return {"text": generation.text, "tokens": generation.stats.completion_tokens,
                "tok_s": generation.stats.tokens_per_second, "load_s": loaded, "devices": names,
                "buffers": buffers}
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rpc_client")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe")
    probe.add_argument("endpoint")
    probe.add_argument("--no-link", action="store_true")
    generate = sub.add_parser("generate")
    generate.add_argument("model")
    generate.add_argument("prompt")
    generate.add_argument("--rpc", action="append", default=[])
    generate.add_argument("--max-tokens", type=int, default=24)
    generate.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "probe":
        result = _probe(args.endpoint, not args.no_link)
    else:
        result = _generate(args.model, args.prompt, args.rpc, args.max_tokens, args.threads)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
