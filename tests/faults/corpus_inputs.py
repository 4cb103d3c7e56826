"""The fault suite's non-GGUF bad inputs: chat-template payloads, safetensors files, Hugging Face folders.

Each safetensors entry is a `Case` (see corpus_gguf); each HF-folder entry breaks a copied checkpoint in place.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .corpus_gguf import Case

# Chat-template payloads: untrusted code that must neither run nor crash nor hang the app.
PWNED_MARKER = "corral-template-pwned"


def template_payloads(marker_dir: Path) -> dict[str, str]:
    """name -> template source; `marker_dir / PWNED_MARKER` appears only if a payload escapes the sandbox."""
    marker = str(marker_dir / PWNED_MARKER)
    return {
        "injection_globals": "{{ cycler.__init__.__globals__.os.popen('touch " + marker + "').read() }}",
        "injection_mro": (
            "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
            "{{ c(['touch', '" + marker + "']) }}{% endif %}{% endfor %}"
        ),
        "injection_attr": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch "
        + marker
        + "') }}",
        "loop": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x",
        "explode_repeat": "{{ 'A' * 1000000000 }}",
        "explode_replace": (
            "{% set ns = namespace(x='aa') %}{% for i in range(40) %}"
            "{% set ns.x = ns.x | replace('a', ns.x) %}{% endfor %}{{ ns.x }}"
        ),
        "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "syntax_error": "{% for m in messages %}{{ m['content'] }",
    }



# ----------------------------------------------------------------------------------- safetensors


def safetensors_bytes(header: dict[str, Any] | bytes, data: bytes, *, declared_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + data


def _good_st_header() -> dict[str, Any]:
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [32, 40]},
    }


def good_safetensors() -> bytes:
    return safetensors_bytes(_good_st_header(), bytes(range(40)))


def safetensors_cases() -> list[Case]:
    """Malformed safetensors files, each a mutation of a valid two-tensor file."""
    good = _good_st_header()

    def mut(name: str, **entry: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(good))
        doc[name].update(entry)
        return doc

    data = bytes(range(40))
    deep = b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    return [
        Case("st_empty", b"", r"shorter than 8 bytes"),
        Case("st_header_len_absurd", struct.pack("<Q", 1 << 62) + b"{}", r"exceeds the .*cap"),
        Case("st_header_len_past_end", struct.pack("<Q", 10_000) + b"{}", r"past the end"),
        Case("st_header_not_json", safetensors_bytes(b"{not json at all", data), r"not valid UTF-8 JSON"),
        Case("st_header_not_object", safetensors_bytes(b"[1, 2, 3]", data), r"does not start with|not a JSON object"),
        Case("st_header_deeply_nested", safetensors_bytes(deep, data), r"invalid safetensors header"),
        Case("st_overlapping", safetensors_bytes(mut("b", data_offsets=[24, 32]), data), r"overlaps"),
        Case("st_gap", safetensors_bytes(mut("b", data_offsets=[34, 42]), data + b"xx"), r"gap"),
        Case("st_data_past_end", safetensors_bytes(good, data[:36]), r"past the end"),
        Case("st_data_short_of_end", safetensors_bytes(good, data + b"extra"), r"before the end"),
        Case("st_dtype_shape_mismatch", safetensors_bytes(mut("a", shape=[3, 4]), data), r"want 48"),
        Case("st_unknown_dtype", safetensors_bytes(mut("a", dtype="F128"), data), r"unsupported dtype"),
        Case("st_negative_shape", safetensors_bytes(mut("a", shape=[-2, -4]), data), r"bad shape"),
        Case("st_bad_offsets", safetensors_bytes(mut("a", data_offsets=[32, 0]), data), r"bad data_offsets"),
    ]


# ------------------------------------------------------------------------------- HF folders


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A cheap copy of a checkpoint folder (weights hard-linked: corral must never write to its input)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.link(f, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)
    return dst


def replace_shard(folder: Path, data: bytes) -> Path:
    """Give the first shard of a `copy_checkpoint` folder new bytes; return it."""
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.unlink()  # break the hard link first: never modify the shared original
    shard.write_bytes(data)
    return shard


def _truncate_shard(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[-1]
    raw = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(raw[:-1000])


def _shape_mismatch(folder: Path) -> None:
    _edit_json(folder / "config.json", lambda c: c.update(hidden_size=c["hidden_size"] * 2))


HF_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "hf_unknown_architecture": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(architectures=["MambaForCausalLM"],
                                                                    model_type="mamba")),
        r"(?i)mamba|architecture|unsupported",
    ),
    "hf_missing_config": (lambda d: (d / "config.json").unlink(), r"config\.json"),
    "hf_config_not_json": (lambda d: (d / "config.json").write_text("{oops"), r"config\.json"),
    "hf_missing_tokenizer_json": (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer\.json"),
    "hf_missing_tokenizer_config": (lambda d: (d / "tokenizer_config.json").unlink(), r"tokenizer_config\.json"),
    "hf_shapes_disagree_with_config": (_shape_mismatch, r"(?i)shape"),
    "hf_missing_shard": (lambda d: sorted(d.glob("*.safetensors"))[-1].unlink(), r"safetensors"),
    "hf_shard_header_garbage": (lambda d: replace_shard(d, b"\xff" * 64), r"safetensors"),
    "hf_shard_truncated": (_truncate_shard, r"safetensors"),
    "hf_index_not_json": (lambda d: (d / "model.safetensors.index.json").write_text("]["), r"index"),
    "hf_no_weights": (lambda d: [f.unlink() for f in d.glob("*.safetensors*")], r"(?i)safetensors|weights"),
}
