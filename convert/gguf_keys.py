"""Type and range checks for the GGUF keys that corral and llama.cpp size their work by.

A header can be well-formed and still claim 2^40 layers or store `split.count` as a string;
`gguf_file` calls `check_known_keys` once every key has been read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import Keys

from .errors import InvalidGGUF
from .packed_strings import PackedStrings

MAX_COUNT = 1 << 24  # no real model has 16M keys, tensors or vocab entries

# Hyperparameters that size loops and buffers downstream (planner, engine): sane upper bounds.
_INT_BOUNDS: dict[str, int] = {
    Keys.LLM.BLOCK_COUNT: 1 << 16,
    Keys.LLM.CONTEXT_LENGTH: 1 << 32,
    Keys.LLM.EMBEDDING_LENGTH: 1 << 20,
    Keys.LLM.FEED_FORWARD_LENGTH: 1 << 24,
    Keys.LLM.VOCAB_SIZE: MAX_COUNT,
    Keys.Attention.HEAD_COUNT: 1 << 16,
    Keys.Attention.HEAD_COUNT_KV: 1 << 16,
    Keys.Attention.KEY_LENGTH: 1 << 16,
    Keys.Attention.VALUE_LENGTH: 1 << 16,
    Keys.Rope.DIMENSION_COUNT: 1 << 16,
}
_GLOBAL_INT_BOUNDS: dict[str, int] = {
    Keys.Split.LLM_KV_SPLIT_COUNT: 99999,
    Keys.Split.LLM_KV_SPLIT_NO: 99999,
    Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT: MAX_COUNT,
    Keys.General.FILE_TYPE: 1 << 16,
    Keys.Tokenizer.BOS_ID: MAX_COUNT,
    Keys.Tokenizer.EOS_ID: MAX_COUNT,
}
_STRING_KEYS = (
    Keys.General.ARCHITECTURE,
    Keys.General.NAME,
    Keys.Tokenizer.MODEL,
    Keys.Tokenizer.PRE,
    Keys.Tokenizer.CHAT_TEMPLATE,
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_known_keys(metadata: dict[str, Any], path: Path) -> None:
    """Keys that corral and llama.cpp rely on must have sane types and values (else InvalidGGUF)."""

    def fail(what: str) -> InvalidGGUF:
        return InvalidGGUF(f"invalid GGUF header: {what}", path=path)

    for key in _STRING_KEYS:
        if key in metadata and not isinstance(metadata[key], str):
            raise fail(f"{key} must be a string")
    tokens = metadata.get(Keys.Tokenizer.LIST)
    if tokens is not None and not (isinstance(tokens, PackedStrings)
                                   or (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens))):
        raise fail(f"{Keys.Tokenizer.LIST} must be an array of strings")
    arch = metadata.get(Keys.General.ARCHITECTURE)
    bounds = dict(_GLOBAL_INT_BOUNDS)
    if isinstance(arch, str):
        bounds.update({template.format(arch=arch): limit for template, limit in _INT_BOUNDS.items()})
    for key, limit in bounds.items():
        if key not in metadata:
            continue
        value = metadata[key]
        values = value if isinstance(value, list) else [value]  # per-layer lists exist in some architectures
        if not all(_is_int(v) and 0 <= v <= limit for v in values):
            shown = value if not isinstance(value, list) else f"an array of {len(value)}"
            raise fail(f"{key} is {shown!r}, want an integer in 0..{limit:,}")
