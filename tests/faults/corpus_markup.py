"""Untrusted text that looks like Rich / Textual markup: it must always come out exactly as it went in.

`EVIL` fails to parse as markup (a closing tag with nothing open), so any place that parses it crashes;
the styled and emoji pieces parse fine, so a place that parses them silently changes the text instead.
"""

from __future__ import annotations

from pathlib import Path

from .corpus_gguf import KV, V, rewrite_gguf, small_gguf, small_llama_kvs

UNMATCHED = "[/] evil [bold red]x"
STYLED = "[bold red]loud[/bold red] [link=https://example.invalid]click[/link]"
EMOJI = r":smile: \[kept] [reverse]"
EVIL = f"{UNMATCHED} {STYLED} {EMOJI}"

# A folder whose path reads "[/x]" (a closing tag) and a file name that reads as a style.
EVIL_DIR_PARTS = ("[", "x]")
EVIL_FILE = "[bold red]m.gguf"


def evil_dir(base: Path) -> Path:
    """`base/[/x]`, created."""
    folder = base.joinpath(*EVIL_DIR_PARTS)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def raising_template(message: str) -> str:
    """A chat template whose only output is an exception carrying `message`."""
    return "{{ raise_exception(" + repr(message) + ") }}"


def small_named_gguf(dst: Path, name: str = EVIL) -> Path:
    """The fault suite's tiny Llama GGUF with `general.name` set to `name`."""
    kvs = [k for k in small_llama_kvs() if k.key != "general.name"] + [KV("general.name", V.STRING, name)]
    dst.write_bytes(small_gguf(kvs=kvs).data)
    return dst


def renamed_model(src: Path, dst: Path, name: str = EVIL, template: str | None = None) -> Path:
    """A copy of a real GGUF with `general.name` (and optionally the chat template) replaced."""
    kvs = [KV("general.name", V.STRING, name)]
    if template is not None:
        kvs.append(KV("tokenizer.chat_template", V.STRING, template))
    return rewrite_gguf(src, dst, kvs)
