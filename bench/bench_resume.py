"""Resuming a long conversation: time to first token with and without its saved KV state.

    python -m bench.bench_resume [--history-tokens N] [--hidden H] [--layers L]

A miniature Llama (random weights, real tokenizer) large enough that prompt processing is slow on a CPU is
converted to GGUF. One engine answers a long conversation (≥ 2,000 tokens of history) and its KV state is saved
the way `corral chat` / `corral ask -c` save it. Then two fresh engines (each loaded from scratch, as when a chat
is reopened) answer the next turn: one re-reads the whole history (no saved state), the other restores the state
from disk first. Time to first token = state restore (file read, checks, llama.cpp import) + prompt processing +
the first token. Both must generate the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import sys
import tempfile
import time
from pathlib import Path

from corral.app.chats.kv_states import KVStateStore, restore_conversation, save_conversation
from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.engine import load_engine
from corral.app.runtime.setup import EngineOptions

GREEDY = SamplingSettings(temperature=0.0, max_tokens=16, seed=0)


def _model(folder: Path, hidden: int, layers: int) -> Path:
    from corral.convert.converter import convert_checkpoint
    from corral.convert.minimodel import MiniSpec, build_checkpoint

    spec = MiniSpec(n_embd=hidden, n_layer=layers, n_head=hidden // 128, n_head_kv=max(1, hidden // 512),
                    n_ff=int(hidden * 2.75) // 256 * 256, shards=1)
    ckpt = build_checkpoint(folder / "ckpt", spec, seed=3)
    out = folder / "model-f16.gguf"
    convert_checkpoint(ckpt, out, outtype="f16")
    return out


def _history(n_tokens: int) -> list[Message]:
    """User/assistant turns of documentation text, about `n_tokens` long (~4 characters per token)."""
    text = " ".join(pydoc_data.topics.topics.values())
    turns, pos, per_turn = [], 0, 1600
    while pos < n_tokens * 4:
        chunk = text[pos:pos + per_turn]
        turns.append(Message("user" if len(turns) % 2 == 0 else "assistant", chunk))
        pos += per_turn
    if turns[-1].role == "user":
        turns.append(Message("assistant", "Noted."))
    return [Message("system", "You are a careful reader."), *turns]


def _ttft(model: Path, options: EngineOptions, messages: list[Message], store: KVStateStore | None) -> dict:
    engine = load_engine(model, options)
    try:
        t0 = time.perf_counter()
        restored, problem = restore_conversation(engine, store, 1) if store else (0, "")
        restore_s = time.perf_counter() - t0
        first: list[float] = []
        t1 = time.perf_counter()
        gen = engine.generate(messages, GREEDY, on_text=lambda _t: first.append(time.perf_counter()) if not first
                              else None)
        first_token_s = (first[0] if first else time.perf_counter()) - t1
        return {"restored_tokens": restored, "problem": problem, "restore_s": restore_s,
                "prompt_s": gen.stats.prompt_seconds, "prompt_tokens": gen.stats.prompt_tokens,
                "ttft_s": restore_s + first_token_s, "tokens": list(engine.last_completion_tokens)}
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history-tokens", type=int, default=2400)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (1 keeps small decodes steady on a shared 2-core machine)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corral-bench-resume-") as tmp:
        folder = Path(tmp)
        model = _model(folder, args.hidden, args.layers)
        model_mb = model.stat().st_size / 1e6
        options = EngineOptions(n_ctx=8192, n_threads=args.threads)
        history = _history(args.history_tokens)
        store = KVStateStore(folder / "kv", max_bytes=8 * 1024**3)
        first = load_engine(model, options)
        try:
            reply = first.generate(history, GREEDY)
            saved = save_conversation(first, store, 1)
        finally:
            first.close()
        nxt = [*history, Message("assistant", reply.text), Message("user", "Summarise the above in one line.")]
        cold = _ttft(model, options, nxt, None)
        warm = _ttft(model, options, nxt, store)
    same = cold["tokens"] == warm["tokens"]
    speedup = cold["ttft_s"] / warm["ttft_s"] if warm["ttft_s"] > 0 else float("inf")
    print(f"model: {args.layers} layers × {args.hidden} hidden, F16, {model_mb:.0f} MB, {args.threads} thread(s); "
          f"next-turn prompt {cold['prompt_tokens']} tokens; saved state {saved / 1e6:.1f} MB")
    print("| resume | restored tokens | prompt tokens decoded (s) | time to first token | greedy tokens |")
    print("|---|---|---|---|---|")
    for name, r in (("no saved state", cold), ("saved KV state", warm)):
        print(f"| {name} | {r['restored_tokens']} | {r['prompt_s']:.2f} s | {r['ttft_s']:.2f} s | "
              f"{'same' if same else 'DIFFER'} |")
    print(f"\nspeed-up of time to first token: {speedup:.1f}×")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_resume.json").write_text(json.dumps({"cold": cold, "warm": warm, "speedup": speedup,
                                                       "saved_bytes": saved, "same_tokens": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
