"""A summary of a GGUF model for `corral info`: what it is, how big, how it is stored."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gguf import Keys, LlamaFileType

from .gguf_file import GGUFModelFile, read_gguf


@dataclass(frozen=True)
class ModelSummary:
    path: str
    files: list[str]
    split_count: int
    name: str | None
    architecture: str
    parameters: int
    file_bytes: int
    tensor_bytes: int
    bits_per_weight: float
    file_type: str | None
    tensor_types: dict[str, int]
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    feed_forward_length: int | None
    vocab_size: int | None
    tokenizer_model: str | None
    tokenizer_pre: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    has_chat_template: bool
    rope_freq_base: float | None
    tensor_count: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def file_type_name(value: Any) -> str | None:
    """general.file_type id -> a llama.cpp name such as 'Q4_K_M' (None when absent or unknown)."""
    if value is None:
        return None
    try:
        name = LlamaFileType(int(value)).name
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def summarize(path: str | Path, model: GGUFModelFile | None = None) -> ModelSummary:
    """Read a GGUF header (validated) and summarize it; no weights are loaded."""
    model = model or read_gguf(path)
    histogram = Counter(t.ggml_type.name for t in model.tensors)
    params = model.n_parameters
    vocab = model.arch_key(Keys.LLM.VOCAB_SIZE) or model.n_tokens or None
    head_kv = model.arch_key(Keys.Attention.HEAD_COUNT_KV)
    if isinstance(head_kv, list):  # per-layer lists exist in some architectures
        head_kv = max(head_kv) if head_kv else None
    return ModelSummary(
        path=str(path),
        files=[str(f) for f in model.files],
        split_count=len(model.files),
        name=model.get(Keys.General.NAME),
        architecture=model.architecture,
        parameters=params,
        file_bytes=model.file_bytes,
        tensor_bytes=model.tensor_bytes,
        bits_per_weight=round(8 * model.tensor_bytes / params, 3) if params else 0.0,
        file_type=file_type_name(model.get(Keys.General.FILE_TYPE)),
        tensor_types=dict(sorted(histogram.items(), key=lambda kv: -kv[1])),
        context_length=model.arch_key(Keys.LLM.CONTEXT_LENGTH),
        embedding_length=model.arch_key(Keys.LLM.EMBEDDING_LENGTH),
        block_count=model.arch_key(Keys.LLM.BLOCK_COUNT),
        head_count=model.arch_key(Keys.Attention.HEAD_COUNT),
        head_count_kv=head_kv,
        feed_forward_length=model.arch_key(Keys.LLM.FEED_FORWARD_LENGTH),
        vocab_size=vocab,
        tokenizer_model=model.get(Keys.Tokenizer.MODEL),
        tokenizer_pre=model.get(Keys.Tokenizer.PRE),
        bos_token_id=model.get(Keys.Tokenizer.BOS_ID),
        eos_token_id=model.get(Keys.Tokenizer.EOS_ID),
        has_chat_template=bool(model.get(Keys.Tokenizer.CHAT_TEMPLATE)),
        rope_freq_base=model.arch_key(Keys.Rope.FREQ_BASE),
        tensor_count=len(model.tensors),
    )
