"""Llama 3 tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja) -> GGUF vocab keys.

Produces the same keys, values and order as llama.cpp's converter for a byte-level BPE (gpt2 /
llama-bpe) tokenizer: token strings, token types (added special tokens are CONTROL), merges,
special token ids (tokenizer_config first, config.json for the rest), add_bos/add_eos/add_sep
from the tokenizer's post-processor, the chat template and normalizer flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from string import ascii_letters, digits
from typing import Any

from gguf import GGUFValueType, Keys, TokenType

from .errors import InvalidConfig, UnsupportedModel

KV = tuple[str, Any, GGUFValueType]

# The pre-tokenizer regex of Llama 3 (tiktoken's cl100k-style split with 1-3 digit groups).
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_ID_KEYS = {
    "bos": Keys.Tokenizer.BOS_ID,
    "eos": Keys.Tokenizer.EOS_ID,
    "unk": Keys.Tokenizer.UNK_ID,
    "sep": Keys.Tokenizer.SEP_ID,
    "pad": Keys.Tokenizer.PAD_ID,
    "mask": Keys.Tokenizer.MASK_ID,
    "eot": Keys.Tokenizer.EOT_ID,
    "eom": Keys.Tokenizer.EOM_ID,
}
_ADD_KEYS = {"bos": Keys.Tokenizer.ADD_BOS, "eos": Keys.Tokenizer.ADD_EOS, "sep": Keys.Tokenizer.ADD_SEP}


@dataclass(frozen=True)
class TokenizerFiles:
    tokenizer: dict[str, Any]
    tokenizer_config: dict[str, Any] | None
    chat_template_file: str | None
    folder: Path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidConfig(f"not valid JSON ({exc})", path=path) from exc


def read_tokenizer_files(folder: Path) -> TokenizerFiles:
    """Load the tokenizer files of a checkpoint folder; tokenizer.json is required."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InvalidConfig("tokenizer.json is missing (needed for the GGUF vocabulary)", path=path)
    tokenizer = _read_json(path)
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("model"), dict):
        raise InvalidConfig("no tokenizer model in tokenizer.json", path=path)
    tc_path = folder / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.is_file() else None
    if tc is not None and not isinstance(tc, dict):
        raise InvalidConfig("tokenizer_config.json is not a JSON object", path=tc_path)
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    if template is None and (folder / "chat_template.json").is_file():
        doc = _read_json(folder / "chat_template.json")
        template = doc.get("chat_template") if isinstance(doc, dict) else None
    return TokenizerFiles(tokenizer, tc, template, folder)


def tokenizer_pre(tokenizer: dict[str, Any], path: Path) -> str:
    """'llama-bpe' for the Llama 3 byte-level BPE pre-tokenizer; anything else is unsupported."""
    model = tokenizer["model"]
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    patterns = [
        (s.get("pattern") or {}).get("Regex") for s in steps if isinstance(s, dict) and s.get("type") == "Split"
    ]
    byte_level = any(isinstance(s, dict) and s.get("type") == "ByteLevel" for s in steps)
    if model.get("type") != "BPE" or not byte_level or LLAMA3_SPLIT_REGEX not in patterns:
        raise UnsupportedModel("tokenizer.json is not a Llama 3 byte-level BPE tokenizer", path=path)
    return "llama-bpe"


def _looks_special(token: str) -> bool:
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def token_list(tokenizer: dict[str, Any], vocab_size: int, path: Path) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1; holes become [PAD<id>] UNUSED."""
    vocab = tokenizer["model"].get("vocab")
    if not isinstance(vocab, dict):
        raise InvalidConfig("tokenizer.json model.vocab is not an object", path=path)
    by_id: dict[int, str] = {}
    for tok, tid in vocab.items():
        by_id[int(tid)] = tok
    added: dict[int, dict[str, Any]] = {}
    for entry in tokenizer.get("added_tokens") or []:
        tid, content = entry.get("id"), entry.get("content")
        if isinstance(tid, int) and isinstance(content, str):
            by_id[tid] = content
            added[tid] = entry
    if by_id and max(by_id) >= vocab_size:
        raise InvalidConfig(f"tokenizer has id {max(by_id)}, beyond config vocab_size {vocab_size}", path=path)
    added_contents = {e["content"] for e in added.values()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif tok in added_contents:
            entry = added.get(i)
            if (entry is not None and entry.get("special")) or _looks_special(tok):
                types.append(int(TokenType.CONTROL))
            else:
                tok = tok.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
            tokens.append(tok)
        else:
            tokens.append(tok)
            types.append(int(TokenType.NORMAL))
    return tokens, types


def merges_list(tokenizer: dict[str, Any], path: Path) -> list[str]:
    merges = tokenizer["model"].get("merges")
    if not isinstance(merges, list) or not merges:
        raise InvalidConfig("tokenizer.json has no BPE merges", path=path)
    if isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2:
        # Newer tokenizers store pairs; GGUF stores "a b" with spaces inside parts as U+0120.
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair) for pair in merges]
    raise InvalidConfig("unknown merges format in tokenizer.json", path=path)


def _special_id(tc: dict[str, Any], typ: str, added_tokens: list[dict[str, Any]]) -> int | None:
    entry = tc.get(f"{typ}_token")
    content = entry.get("content") if isinstance(entry, dict) else entry
    if not isinstance(content, str):
        return None
    return next((a.get("id") for a in added_tokens if a.get("content") == content), None)


def _post_processor_flags(tokenizer: dict[str, Any], tc: dict[str, Any] | None) -> dict[str, bool]:
    """add_bos / add_eos / add_sep as read from the post-processor (ByteLevel, TemplateProcessing)."""
    flags: dict[str, bool] = {}
    post = tokenizer.get("post_processor")
    if not isinstance(post, dict):
        return flags
    cfg = tc or {}

    def content(key: str) -> str | None:
        v = cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    bos, eos, sep, cls = content("bos_token"), content("eos_token"), content("sep_token"), content("cls_token")
    for proc in post.get("processors", [post]):
        kind = proc.get("type")
        if kind == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            flags.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            single, pair = proc.get("single", []), proc.get("pair", [])
            first = last = None
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                if first:
                    flags["bos"] = first in (bos, cls) or not tc
                last = single[-1].get("SpecialToken", {}).get("id")
                if last:
                    flags["eos"] = last == eos or not tc
            if pair:
                start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
                stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
                pair = pair[start:stop]
                if pair and pair[0].get("Sequence", {}).get("id") == "A" and pair[-1].get("Sequence", {}).get("id") == "B":
                    middle = pair[1:-1]
                    if middle:
                        add_sep = False
                        mid0 = middle[0].get("SpecialToken", {}).get("id")
                        if mid0 in (sep, eos) and not last:
                            add_sep = True
                        if len(middle) == 2 and middle[1].get("SpecialToken", {}).get("id") in (sep, eos):
                            add_sep = True
                        flags["sep"] = add_sep
    return flags


def _normalizer_flags(norm: Any, out: dict[str, bool]) -> None:
    if not isinstance(norm, dict):
        return
    kind = norm.get("type")
    if kind == "Lowercase":
        out["lowercase"] = True
    elif kind == "StripAccents":
        out["strip_accents"] = True
    elif kind == "BertNormalizer":
        if "lowercase" in norm:
            out["lowercase"] = bool(norm["lowercase"])
        if "strip_accents" in norm and norm["strip_accents"] is not None:
            out["strip_accents"] = bool(norm["strip_accents"])
    elif kind == "Sequence":
        for sub in norm.get("normalizers", []):
            _normalizer_flags(sub, out)


def _chat_template_kvs(template: Any) -> list[KV]:
    if isinstance(template, str):
        return [(Keys.Tokenizer.CHAT_TEMPLATE, template, GGUFValueType.STRING)] if template else []
    if not isinstance(template, list):
        return []
    kvs: list[KV] = []
    names: list[str] = []
    default = None
    for choice in template:
        name = "".join(c if c in ascii_letters + digits else "_" for c in str(choice.get("name", "")))
        body = choice.get("template")
        if not name or body is None:
            continue
        if name == "default":
            default = body
        else:
            names.append(name)
            if body:
                kvs.append((Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), body, GGUFValueType.STRING))
    if names:
        kvs.append((Keys.Tokenizer.CHAT_TEMPLATES, sorted(set(names)), GGUFValueType.ARRAY))
    if default:
        kvs.append((Keys.Tokenizer.CHAT_TEMPLATE, default, GGUFValueType.STRING))
    return kvs


def vocab_kvs(folder: Path, vocab_size: int, config: dict[str, Any]) -> list[KV]:
    """All tokenizer.* GGUF keys for the checkpoint in `folder`, in llama.cpp's order."""
    files = read_tokenizer_files(folder)
    tk, tc = files.tokenizer, files.tokenizer_config
    path = folder / "tokenizer.json"
    kvs: list[KV] = []
    if tc is not None and tc.get("add_prefix_space") is not None:
        kvs.append((Keys.Tokenizer.ADD_PREFIX, bool(tc["add_prefix_space"]), GGUFValueType.BOOL))
    pre = tokenizer_pre(tk, path)
    tokens, types = token_list(tk, vocab_size, path)
    kvs += [
        (Keys.Tokenizer.MODEL, "gpt2", GGUFValueType.STRING),
        (Keys.Tokenizer.PRE, pre, GGUFValueType.STRING),
        (Keys.Tokenizer.LIST, tokens, GGUFValueType.ARRAY),
        (Keys.Tokenizer.TOKEN_TYPE, types, GGUFValueType.ARRAY),
        (Keys.Tokenizer.MERGES, merges_list(tk, path), GGUFValueType.ARRAY),
    ]
    flags = _post_processor_flags(tk, tc)
    ids: dict[str, int] = {}

    def set_id(typ: str, tid: Any) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0 and typ not in ids:
            ids[typ] = tid

    added = [a for a in tk.get("added_tokens") or [] if isinstance(a, dict)]
    template = None
    if tc is not None:
        template = tc.get("chat_template", files.chat_template_file)
        for typ in SPECIAL_TYPES:
            entry = tc.get(f"add_{typ}_token")
            if isinstance(entry, bool) and typ not in flags:
                flags[typ] = entry
            set_id(typ, _special_id(tc, typ, added))
    else:
        template = files.chat_template_file
    for typ in SPECIAL_TYPES:
        set_id(typ, config.get(f"{typ}_token_id"))
    for typ, tid in ids.items():
        if typ in _ID_KEYS:
            kvs.append((_ID_KEYS[typ], tid, GGUFValueType.UINT32))
    for typ, value in flags.items():
        if typ in _ADD_KEYS:
            kvs.append((_ADD_KEYS[typ], value, GGUFValueType.BOOL))
    kvs += _chat_template_kvs(template)
    norm: dict[str, bool] = {}
    _normalizer_flags(tk.get("normalizer"), norm)
    if "lowercase" in norm:
        kvs.append((Keys.Tokenizer.NORMALIZER_LOWERCASE, norm["lowercase"], GGUFValueType.BOOL))
    if "strip_accents" in norm:
        kvs.append((Keys.Tokenizer.NORMALIZER_STRIP_ACCENTS, norm["strip_accents"], GGUFValueType.BOOL))
    return kvs
