"""Attaching a draft model for speculative decoding: the compatibility check and the draft's load.

A draft can only propose tokens the target understands: both must share the vocabulary (size and
token texts), the special tokens (BOS/EOS/EOT/EOM ids and texts) and the tokenizer (model and
pre-tokenizer). The check reads both GGUF headers, so a mismatch is refused before anything loads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.app.runtime.api import GenerationStats
from corral.app.runtime.setup import EngineOptions, resolve_model_path
from corral.convert.errors import UsageError

if TYPE_CHECKING:
    from corral.app.runtime.engine import LlamaEngine
    from corral.convert.gguf_file import GGUFModelFile
    from corral.offload.plan import Plan

_SPECIAL = (("BOS", "tokenizer.ggml.bos_token_id"), ("EOS", "tokenizer.ggml.eos_token_id"),
            ("EOT", "tokenizer.ggml.eot_token_id"), ("EOM", "tokenizer.ggml.eom_token_id"))
_SPECIAL_TEXTS = ("<|eot_id|>", "<|eom_id|>")  # Llama 3's end-of-turn/message tokens, found by text when no key


def _special(tokens: list[str], model: GGUFModelFile) -> dict[str, tuple[int | None, str | None]]:
    found: dict[str, tuple[int | None, str | None]] = {}
    for name, key in _SPECIAL:
        value = model.get(key)
        i = int(value) if value is not None else None
        found[name] = (i, tokens[i] if i is not None and 0 <= i < len(tokens) else None)
    for text in _SPECIAL_TEXTS:
        found[text] = (tokens.index(text) if text in tokens else None, text)
    return found


def incompatibility(target: GGUFModelFile, draft: GGUFModelFile) -> str | None:
    """Why `draft` cannot draft for `target` (None when it can)."""
    t_tokens, d_tokens = list(target.get("tokenizer.ggml.tokens") or []), list(draft.get("tokenizer.ggml.tokens") or [])
    if not d_tokens or len(t_tokens) != len(d_tokens):
        return f"its vocabulary has {len(d_tokens):,} tokens, the target's {len(t_tokens):,}"
    for key, what in (("tokenizer.ggml.model", "tokenizer model"), ("tokenizer.ggml.pre", "pre-tokenizer")):
        if target.get(key) != draft.get(key):
            return f"its {what} is {draft.get(key)!r}, the target's {target.get(key)!r}"
    t_special, d_special = _special(t_tokens, target), _special(d_tokens, draft)
    for name, value in t_special.items():
        if d_special[name] != value:
            return f"its {name} token is {d_special[name][1]!r} (id {d_special[name][0]}), the target's " \
                   f"{value[1]!r} (id {value[0]})"
    if t_tokens != d_tokens:
        at = next(i for i, (a, b) in enumerate(zip(t_tokens, d_tokens)) if a != b)
        return f"token {at} is {d_tokens[at]!r} in it, {t_tokens[at]!r} in the target"
    return None


def check_draft(target: GGUFModelFile, draft_path: str | Path) -> tuple[Path, GGUFModelFile]:
    """The draft's path and header; UsageError (one line) when it cannot draft for `target`."""
    from corral.convert.gguf_file import read_gguf

    path = resolve_model_path(draft_path)
    draft = read_gguf(path)
    why = incompatibility(target, draft)
    if why is not None:
        raise UsageError(f"--draft {path.name} cannot draft for this model: {why}")
    return path, draft


def draft_options(options: EngineOptions, n_ctx: int | None = None) -> EngineOptions:
    """The draft's own load options: the target's, without the draft and its GPU layer override."""
    return replace(options, draft=None, n_gpu_layers=None, n_ctx=n_ctx if n_ctx is not None else options.n_ctx)


def attach_draft(engine: LlamaEngine, options: EngineOptions, draft_path: Path, draft_file: GGUFModelFile, *,
                 cancel: threading.Event | None = None, progress: Callable[[float], None] | None = None) -> None:
    """Load the draft (with the target plan's draft plan, else its own) and give `engine` a speculator driving
    it; on failure `engine` is closed too."""
    from corral.app.runtime.engine import load_engine
    from corral.app.runtime.speculative import Speculator

    try:
        plan: Plan | None = getattr(engine.plan, "draft", None)
        opts = draft_options(options)
        if engine.streamer is not None and options.use_mmap is None:
            # the draft runs k times per step: read into its own memory, so the target's stream never evicts it
            opts = replace(opts, use_mmap=False)
        if plan is not None:
            plan = replace(plan, load=replace(plan.load, n_ctx=min(plan.load.n_ctx, engine.n_ctx)))
            opts = replace(opts, n_ctx=None)
        else:
            opts = replace(opts, n_ctx=min(engine.n_ctx, options.n_ctx or engine.n_ctx))
        draft = load_engine(draft_path, opts, plan=plan, model_file=draft_file, cancel=cancel, progress=progress)
        engine.speculator = Speculator(engine, draft, options.draft_max)
    except BaseException:
        engine.close()
        raise
    engine.warnings.extend(f"draft: {w}" for w in draft.warnings)


def draft_json(engine: Any, stats: GenerationStats) -> dict[str, Any]:
    """--json's speculative fields: the draft and this reply's drafted/accepted counts ({} without a draft)."""
    spec = getattr(engine, "speculator", None)
    if spec is None:
        return {}
    return {"draft_model": spec.draft.model_name, "drafted_tokens": stats.drafted_tokens,
            "accepted_tokens": stats.accepted_tokens, "acceptance_rate": round(stats.acceptance_rate, 4)}
