"""Long string arrays of a GGUF header are kept packed: they read back as gguf-py's own reader decodes them."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from corral.convert.gguf_file import PACK_MIN, read_gguf
from corral.convert.gguf_summary import summarize
from corral.convert.packed_strings import PackedStrings
from tests.helpers.gguf_files import write_gguf


def _vocab(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcĠĊé漢 \n<|>"  # multi-byte UTF-8, spaces, newlines, special-token punctuation
    return [f"<|special_{i}|>" if i % 997 == 0 else "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
            for i in range(n)]


def _write(path: Path, tokens: list[str], merges: list[str]) -> Path:
    return write_gguf(path, {"llama.block_count": 1, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges},
                      {"t0": np.zeros((2, 32), dtype=np.float32)})


def _reference(path: Path, key: str) -> list[str]:
    field = GGUFReader(path).fields[key]
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def test_a_vocabulary_reads_back_packed_as_gguf_py_reads_it(tmp_path: Path) -> None:
    tokens, merges = _vocab(PACK_MIN + 1234), [f"{a} {b}" for a, b in zip(_vocab(PACK_MIN, 1), _vocab(PACK_MIN, 2))]
    path = _write(tmp_path / "v.gguf", tokens, merges)
    model = read_gguf(path)
    got = model.get("tokenizer.ggml.tokens")
    assert isinstance(got, PackedStrings) and isinstance(model.get("tokenizer.ggml.merges"), PackedStrings)
    ref = _reference(path, "tokenizer.ggml.tokens")
    assert ref == tokens  # the fixture round-trips through gguf-py itself
    assert len(got) == len(ref) and list(got) == ref and got == ref and ref == got
    assert [got[i] for i in (0, 1, 997, len(ref) - 1, -1)] == [ref[i] for i in (0, 1, 997, len(ref) - 1, -1)]
    assert got[10:20] == ref[10:20] and got[::-1000] == ref[::-1000]
    assert "<|special_997|>" in got and got.index("<|special_1994|>") == 1994
    assert got != ref[:-1] and got != [*ref[:-1], "zz"] and got != "not a list"
    assert list(model.get("tokenizer.ggml.merges")) == _reference(path, "tokenizer.ggml.merges") == merges
    assert summarize(path, model).vocab_size == len(tokens)


def test_packed_arrays_take_a_fraction_of_a_list(tmp_path: Path) -> None:
    tokens = _vocab(PACK_MIN * 4)
    got = read_gguf(_write(tmp_path / "v.gguf", tokens, ["a b"])).get("tokenizer.ggml.tokens")
    as_list = sys.getsizeof(tokens) + sum(sys.getsizeof(t) for t in tokens)
    assert got.nbytes < as_list / 3


def test_short_arrays_stay_lists(tmp_path: Path) -> None:
    model = read_gguf(_write(tmp_path / "v.gguf", ["a", "b"], ["a b"]))
    assert model.get("tokenizer.ggml.tokens") == ["a", "b"] and isinstance(model.get("tokenizer.ggml.tokens"), list)
