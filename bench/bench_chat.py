"""Streaming speed of `corral chat` (the Textual TUI, headless) against `corral ask`'s engine path.

    python -m bench.bench_chat [--quick] [--tokens N] [--repeat N] [--threads N] [--model FILE.gguf]

Both sides use the same loaded engine, the same conversation and greedy sampling, so they generate
the same tokens. The ask side is what `corral ask` does per token (write + flush to a stream), with
no Textual app alive; the chat side starts the app (Textual `run_test`, headless, 120x40; start-up
not timed), types the prompt and waits for the reply to finish rendering. Rounds alternate between the sides; the table shows medians and the
median of per-round ratios chat / ask (1.0 = no cost from the UI). Tokens per process CPU-second
(all threads, UI included) is also reported: unlike tok/s it does not depend on how much CPU other
programs leave to the benchmark, so with --threads 1 its ratio is the UI's own overhead. tok/s is the engine's own
generation rate (prompt time excluded); wall time is Enter to last paint for chat, call to return for ask.
Default model: the miniature Llama 3.1 (256 hidden, 2 layers, real 128K vocab) converted to F32 by corral.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from corral.app.chats.store import ChatStore
from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.engine import EngineOptions, load_engine
from corral.tui.app import make_app
from corral.tui.prompt_input import PromptInput

PROMPT = "Write a very long story about a llama who learns to run large language models."
OUT = Path(__file__).resolve().parent / "out" / "bench_chat.json"


def build_model(folder: Path) -> Path:
    from corral.convert.converter import convert_checkpoint
    from corral.convert.minimodel import MiniSpec, build_checkpoint

    ckpt = build_checkpoint(folder / "mini-ckpt", MiniSpec(), seed=0)
    out = folder / "mini-f32.gguf"
    convert_checkpoint(ckpt, out, outtype="f32")
    return out


def ask_side(engine: Any, settings: SamplingSettings) -> dict[str, float]:
    """`corral ask`'s streaming loop (every piece written and flushed), in a fresh thread like the chat's worker.

    The thread matters on a busy machine: where the calling thread gets scheduled changes llama.cpp's speed
    more than anything the UI does, so both sides generate from a new non-main thread.
    """
    out = io.StringIO()
    result: dict[str, float] = {}

    def on_text(piece: str) -> None:
        out.write(piece)
        out.flush()

    def work() -> None:
        start, cpu = time.perf_counter(), time.process_time()
        generation = engine.generate([Message("user", PROMPT)], settings, on_text=on_text)
        wall = time.perf_counter() - start
        used = time.process_time() - cpu
        result.update(tps=generation.stats.tokens_per_second, tokens=generation.stats.completion_tokens, wall=wall,
                      ui_cpu=0.0, cores=used / wall, tok_per_cpu_s=generation.stats.completion_tokens / used)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result


async def chat_side(pilot: Any, store: ChatStore) -> dict[str, float]:
    app = pilot.app
    chat = app.chat_screen
    await pilot.press("ctrl+n")
    chat.query_one(PromptInput).load_text(PROMPT)
    cpu0, start, proc0 = time.thread_time(), time.perf_counter(), time.process_time()
    await pilot.press("enter")
    while chat.job is not None or not chat.view.boxes() or chat.view.boxes()[-1].status == "streaming":
        await asyncio.sleep(0.02)
    await pilot.pause()  # the last paint
    wall, ui_cpu = time.perf_counter() - start, time.thread_time() - cpu0
    stats = store.get(chat.conversation_id).messages[-1].stats
    assert stats is not None
    used = time.process_time() - proc0
    return {"tps": stats.tokens_per_second, "tokens": stats.completion_tokens, "wall": wall, "ui_cpu": ui_cpu,
            "cores": used / wall, "tok_per_cpu_s": stats.completion_tokens / used}


async def chat_round(engine: Any, store: ChatStore, settings: SamplingSettings) -> dict[str, float]:
    """A fresh app (start-up not timed), one reply, quit."""
    app = make_app(lambda progress, cancel: engine, store, settings, show_list_at_start=False)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.chat_screen is None or not app.chat_screen.is_mounted:
            await asyncio.sleep(0.05)
        await pilot.pause(0.2)
        return await chat_side(pilot, store)


def run_rounds(engine: Any, store: ChatStore, settings: SamplingSettings, repeat: int) -> dict[str, list]:
    """Alternate the sides; the ask side runs with no Textual app alive, exactly like `corral ask`."""
    results: dict[str, list] = {"ask": [], "chat": []}
    ask_side(engine, settings)  # warm-up: page cache, graph, imports on both sides
    asyncio.run(chat_round(engine, store, settings))
    for r in range(repeat):
        for side in (("ask", "chat") if r % 2 == 0 else ("chat", "ask")):
            if side == "ask":
                results["ask"].append(ask_side(engine, settings))
            else:
                results["chat"].append(asyncio.run(chat_round(engine, store, settings)))
        a, c = results["ask"][-1], results["chat"][-1]
        print(f"round {r + 1}: ask {a['tps']:.1f} tok/s ({a['cores']:.2f} cores busy), "
              f"chat {c['tps']:.1f} tok/s ({c['cores']:.2f} cores busy)", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    ap.add_argument("--tokens", type=int, default=0, help="reply length (default 2000; 400 with --quick)")
    ap.add_argument("--repeat", type=int, default=0, help="alternating rounds (default 5; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="GGUF to use instead of the miniature model")
    args = ap.parse_args(argv)
    n_tokens = args.tokens or (400 if args.quick else 2000)
    repeat = args.repeat or (2 if args.quick else 5)
    settings = SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=n_tokens, seed=1)
    with tempfile.TemporaryDirectory(prefix="corral-bench-chat-") as tmp:
        folder = Path(tmp)
        model = args.model or build_model(folder)
        engine = load_engine(model, EngineOptions(n_ctx=n_tokens + 256, n_threads=args.threads))
        store = ChatStore(folder / "chat.sqlite3")
        try:
            results = run_rounds(engine, store, settings, repeat)
        finally:
            store.close()
            engine.close()
    ask, chat = results["ask"], results["chat"]
    ratio = statistics.median(c["tps"] / a["tps"] for a, c in zip(ask, chat))
    wall_ratio = statistics.median(a["wall"] / c["wall"] for a, c in zip(ask, chat))
    summary = {
        "model": str(args.model or "miniature Llama 3.1 F32 (256 hidden, 2 layers, 128K vocab)"),
        "tokens": [int(c["tokens"]) for c in chat], "ask_tokens": [int(a["tokens"]) for a in ask],
        "threads": args.threads, "rounds": repeat, "python_threads": threading.active_count(),
        "ask_tps": statistics.median(a["tps"] for a in ask), "chat_tps": statistics.median(c["tps"] for c in chat),
        "ask_wall_s": statistics.median(a["wall"] for a in ask), "chat_wall_s": statistics.median(c["wall"] for c in chat),
        "chat_ui_cpu_s": statistics.median(c["ui_cpu"] for c in chat),
        "ask_cores": [a["cores"] for a in ask], "chat_cores": [c["cores"] for c in chat],
        "ratio_tps": ratio, "ratio_wall": wall_ratio,
        "round_ratios_tps": [c["tps"] / a["tps"] for a, c in zip(ask, chat)],
        "ratio_tok_per_cpu_s": statistics.median(c["tok_per_cpu_s"] / a["tok_per_cpu_s"] for a, c in zip(ask, chat)),
        "ask_tps_rounds": [a["tps"] for a in ask], "chat_tps_rounds": [c["tps"] for c in chat],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{repeat} alternating rounds, {args.threads} llama.cpp threads, greedy, medians; "
          "ratio = chat / ask per round (1.0 = the UI costs nothing).\n")
    print("| model | threads | reply tokens | ask tok/s | chat tok/s | chat / ask (tok/s) | ask wall s | chat wall s | "
          "ask / chat (wall) | chat / ask (tokens per CPU-s) | UI thread CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {summary['model']} | {args.threads} | {summary['tokens'][0]} | {summary['ask_tps']:.1f} | "
          f"{summary['chat_tps']:.1f} | {ratio:.3f} | {summary['ask_wall_s']:.2f} | {summary['chat_wall_s']:.2f} | "
          f"{wall_ratio:.3f} | {summary['ratio_tok_per_cpu_s']:.3f} | {summary['chat_ui_cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
