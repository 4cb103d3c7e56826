"""The real Llama 3 tokenizer, rebuilt as Hugging Face files without any download.

Meta's `llama-models` package ships the Llama 3 tiktoken file (`tokenizer.model`: one
base64 token and its rank per line). Hugging Face repositories publish the same
vocabulary as `tokenizer.json` (byte-level BPE: GPT-2 byte-to-unicode token strings,
merges ranked by the merged token's rank, 256 special tokens from id 128000). This module
turns the former into the latter so that miniature checkpoints carry the exact 128,256-token
vocabulary of the released models.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InvalidConfig
from .llama_family import BOS_TEXT, EOS_TEXT, EOT_TEXT, FIRST_SPECIAL_ID, special_tokens

# The pre-tokenizer split of Llama 3 (the `pat_str` of Meta's tokenizer).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Our own Llama 3 chat template (header / content / <|eot_id|> per turn). Checkpoints that
# ship Meta's template use theirs; this one is used for miniature models and as the fallback.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def tiktoken_model_path() -> Path:
    """Path of Meta's Llama 3 `tokenizer.model` inside the installed llama-models package."""
    try:
        ref = resources.files("llama_models") / "llama3" / "tokenizer.model"
    except ModuleNotFoundError as exc:
        raise InvalidConfig("the llama-models package is not installed (pip install llama-models)") from exc
    path = Path(str(ref))
    if not path.is_file():
        raise InvalidConfig("llama-models does not ship llama3/tokenizer.model", path=path)
    return path


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file into {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
        except ValueError as exc:
            raise InvalidConfig(f"bad tiktoken line {lineno}", path=path) from exc
    return ranks


@lru_cache(maxsize=2)
def tokenizer_json(path: Path | None = None) -> str:
    """The Hugging Face `tokenizer.json` text for Meta's Llama 3 vocabulary."""
    ranks = read_ranks(path or tiktoken_model_path())
    byte_map = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    # Every way to split a token into two tokens is a merge, ranked by the token it makes
    # (then by the ranks of its parts); with ignore_merges this reproduces tiktoken exactly.
    merges: list[tuple[int, int, int, str]] = []
    for tok, rank in ranks.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], f"{text(left)} {text(right)}"))
    merges.sort()
    n_base = len(ranks)
    specials = special_tokens()
    added = [
        {
            "id": n_base + i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, tok in enumerate(specials)
    ]
    doc: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": BOS_TEXT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [
                        {"SpecialToken": {"id": BOS_TEXT, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": BOS_TEXT, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {BOS_TEXT: {"id": BOS_TEXT, "ids": [n_base], "tokens": [BOS_TEXT]}},
                },
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": [m[3] for m in merges],
        },
    }
    return json.dumps(doc, ensure_ascii=False)


def tokenizer_config(*, instruct: bool, n_base: int = FIRST_SPECIAL_ID, max_length: int = 131072) -> dict[str, Any]:
    """A `tokenizer_config.json` in the style of the published Llama 3.1 repositories."""
    decoder = {
        str(n_base + i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(special_tokens())
    }
    config: dict[str, Any] = {
        "added_tokens_decoder": decoder,
        "bos_token": BOS_TEXT,
        "clean_up_tokenization_spaces": True,
        "eos_token": EOT_TEXT if instruct else EOS_TEXT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if instruct:
        config["chat_template"] = LLAMA3_CHAT_TEMPLATE
    return config
