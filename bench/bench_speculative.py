"""Speculative decoding on a memory-bound target: tok/s with and without a draft, and the acceptance rate.

    python -m bench.bench_speculative [--hidden H] [--ffn N] [--extra-layers N] [--tokens N] [--threads N]

The draft is a small random Llama (real Llama 3 tokenizer, F16). The heavy target computes the
draft's function plus many extra layers: with zero output projections the residual stream is
unchanged, so the draft always agrees with it; with small nonzero ones (scale --partial-scale)
it agrees most of the time; a draft with other weights agrees only by chance. Every run is
greedy and checked to give the plain run's tokens. The target's extra layers make it hundreds
of MB, so each of its tokens reads all that memory, which is what drafting amortises.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np

from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.engine import LlamaEngine, load_engine
from corral.app.runtime.speculative import Speculator
from corral.convert.units import format_bytes

MESSAGES = [Message("user", "Write a long story about a llama who learns to read.")]


def _models(folder: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The four models (written once per folder and shape; --dir keeps them between runs)."""
    from tests.helpers.engine import write_tiny_gguf

    shape = dict(hidden=args.hidden, n_heads=args.hidden // 64, n_kv_heads=max(1, args.hidden // 256), ffn=args.ffn,
                 layer_dtype=np.float16)
    tag = f"h{args.hidden}-f{args.ffn}-x{args.extra_layers}"
    specs = {
        "draft": dict(seed=0),
        "target": dict(seed=0, extra_layers=args.extra_layers),
        "partial": dict(seed=0, extra_layers=args.extra_layers, extra_scale=args.partial_scale),
        "other": dict(seed=5),
    }
    paths = {}
    for name, spec in specs.items():
        suffix = f"-s{args.partial_scale}" if name == "partial" else ""
        path = folder / f"{name}-{tag}{suffix}.gguf"
        if not path.exists():
            write_tiny_gguf(path, n_layers=2, **shape, **spec)  # type: ignore[arg-type]
        paths[name] = path
    return paths


def _load(path: Path, threads: int) -> LlamaEngine:
    from tests.helpers.engine import cpu_plan

    return load_engine(path, plan=cpu_plan(n_threads=threads, n_threads_batch=threads, n_ctx=2048))


PROMPT: str | None = None  # --trained: raw text to continue instead of a chat


def _once(engine: LlamaEngine, settings: SamplingSettings) -> tuple[float, list[int], float]:
    """(tok/s, tokens, acceptance) of one greedy reply from an empty KV cache."""
    engine._reuse_prefix([])
    result = engine.generate(MESSAGES, settings) if PROMPT is None else engine.complete(PROMPT, settings)
    return result.stats.tokens_per_second, list(engine.last_completion_tokens), result.stats.acceptance_rate


def _first_difference(engine: LlamaEngine, base: list[int], other: list[int]) -> str:
    """Where `other` leaves the plain tokens, and the plain choice's lead over the runner-up there."""
    from corral.app.runtime.native import lc

    j = next((i for i, (a, b) in enumerate(zip(base, other)) if a != b), min(len(base), len(other)))
    engine._reuse_prefix([])
    engine._decode_prompt(engine.last_prompt_tokens + base[:j], None)
    n_vocab = int(lc.llama_vocab_n_tokens(engine._vocab))
    logits = np.sort(np.ctypeslib.as_array(lc.llama_get_logits_ith(engine._ctx, -1), shape=(n_vocab,)))[::-1]
    return f"differs at token {j} (lead {logits[0] - logits[1]:.1e})"


def _compare(target: LlamaEngine, drafts: dict[str, LlamaEngine], settings: SamplingSettings, repeat: int,
             draft_max: int) -> list[tuple[str, float, float, float | None, str]]:
    """Rows (draft, median tok/s, median speed-up, acceptance, same tokens?): the runs alternate round by round,
    and each speed-up is against the plain run of the same round (the machine's load drifts)."""
    specs = {name: Speculator(target, d, draft_max) for name, d in drafts.items()}
    speeds: dict[str, list[float]] = {"none": [], **{n: [] for n in drafts}}
    gains: dict[str, list[float]] = {n: [] for n in drafts}
    rates: dict[str, list[float]] = {n: [] for n in drafts}
    same: dict[str, str] = {}
    for _ in range(repeat):
        target.speculator = None
        base, base_tokens, _ = _once(target, settings)
        speeds["none"].append(base)
        for name, spec in specs.items():
            target.speculator = spec
            speed, tokens, rate = _once(target, settings)
            target.speculator = None
            speeds[name].append(speed)
            gains[name].append(speed / base)
            rates[name].append(rate)
            if tokens != base_tokens and name not in same:
                same[name] = _first_difference(target, base_tokens, tokens)
    for spec in specs.values():
        spec.close()
    rows = [("none", statistics.median(speeds["none"]), 1.0, None, "")]
    for name in drafts:
        rows.append((name, statistics.median(speeds[name]), statistics.median(gains[name]),
                     statistics.median(rates[name]), same.get(name, "yes")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--extra-layers", type=int, default=100)
    ap.add_argument("--partial-scale", type=float, default=0.05)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=None, help="Keep the model files here (default: a temporary folder).")
    ap.add_argument("--trained", action="store_true",
                    help="Trained models instead: the 'small' trained Llama drafts for 'base-large' (the trained "
                         "'base' with inert layers), continuing held-out text.")
    args = ap.parse_args()
    settings = SamplingSettings(temperature=0.0, max_tokens=args.tokens)
    if args.trained:
        _trained(args, settings)
        return
    with tempfile.TemporaryDirectory(prefix="corral-spec-") as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = _models(folder, args)
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads; draft "
              f"{format_bytes(sizes['draft'])}, target {format_bytes(sizes['target'])} "
              f"(hidden {args.hidden}, ffn {args.ffn}, 2 + {args.extra_layers} layers, F16)")
        rows = []
        for target_name, draft_names in (("target", ("draft", "other")), ("partial", ("draft",))):
            with _load(paths[target_name], args.threads) as target:
                drafts = {n: _load(paths[n], args.threads) for n in draft_names}
                for row in _compare(target, drafts, settings, args.repeat, args.draft_max):
                    rows.append((target_name, *row))
        print(f"{'target':<10}{'draft':<8}{'tok/s':>8}{'speed-up':>10}{'accepted':>10}  same tokens")
        for target_name, draft_name, speed, gain, rate, same in rows:
            accepted = "-" if rate is None else f"{rate:.0%}"
            print(f"{target_name:<10}{draft_name:<8}{speed:>8.2f}{gain:>9.2f}x{accepted:>10}  {same}")


def held_out_prompts(n: int) -> list[str]:
    """The first 400 characters of the first `n` long held-out paragraphs: text for trained models to continue."""
    from corral.app.runtime.texts import eval_text

    return [p[:400] for p in eval_text().split("\n\n") if len(p) > 200][:n]


def _trained(args: argparse.Namespace, settings: SamplingSettings) -> None:
    """Trained draft and target: the acceptance rate is what two models that learned the same text agree on."""
    global PROMPT
    from tests.helpers.trained import trained_gguf

    paths = {"small": trained_gguf("small", "f16"), "target": trained_gguf("base-large", "f16"),
             "base": trained_gguf("base", "f16")}
    sizes = {k: format_bytes(p.stat().st_size) for k, p in paths.items()}
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads; trained draft 'small' "
          f"{sizes['small']}, target 'base-large' {sizes['target']} (trained 'base' {sizes['base']} + inert layers)")
    print(f"{'prompt':<8}{'draft':<8}{'tok/s':>8}{'speed-up':>10}{'accepted':>10}  same tokens")
    with _load(paths["target"], args.threads) as target:
        for i, text in enumerate(held_out_prompts(3)):
            PROMPT = text
            drafts = {"small": _load(paths["small"], args.threads)}  # _compare closes its drafts
            for draft_name, speed, gain, rate, same in _compare(target, drafts, settings, args.repeat,
                                                                 args.draft_max):
                accepted = "-" if rate is None else f"{rate:.0%}"
                print(f"{i:<8}{draft_name:<8}{speed:>8.2f}{gain:>9.2f}x{accepted:>10}  {same}")


if __name__ == "__main__":
    main()
