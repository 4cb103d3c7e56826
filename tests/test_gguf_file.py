"""The validating GGUF header reader: real files read back; malformed headers are refused with InvalidGGUF."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from corral.convert.errors import InputNotFound, InvalidGGUF
from corral.convert.gguf_file import read_gguf, read_header, split_paths
from corral.convert.tensor_specs import TensorSpec, tensor_nbytes
from tests.helpers.gguf_files import write_gguf


def _write_small(path: Path, n_tensors: int = 3) -> Path:
    kvs = {"llama.block_count": 1, "llama.context_length": 64, "tokenizer.chat_template": "{{ messages }}",
           "tokenizer.ggml.tokens": ["a", "b", "c"]}
    tensors = {f"t{i}": np.full((4, 32), i, dtype=np.float32) for i in range(n_tensors)}
    return write_gguf(path, kvs, {**tensors, "h": np.zeros((2, 32), dtype=np.float16)})


def test_reads_back_what_gguf_writer_wrote(tmp_path: Path) -> None:
    path = _write_small(tmp_path / "m.gguf")
    model = read_gguf(path)
    assert model.architecture == "llama"
    assert model.get("llama.block_count") == 1
    assert model.get("tokenizer.ggml.tokens") == ["a", "b", "c"]
    assert [t.name for t in model.tensors] == ["t0", "t1", "t2", "h"]
    t1 = model.tensors[1]
    assert t1.shape == (32, 4) and t1.ggml_type == GGMLQuantizationType.F32 and t1.nbytes == 4 * 32 * 4
    # the recorded offset points at the tensor's bytes
    raw = path.read_bytes()[t1.offset : t1.offset + t1.nbytes]
    assert np.frombuffer(raw, dtype=np.float32).tolist() == [1.0] * 128
    assert model.tensors[3].ggml_type == GGMLQuantizationType.F16 and model.tensors[3].nbytes == 128
    assert model.file_bytes == path.stat().st_size
    assert model.n_parameters == 3 * 128 + 64


def test_kv_bytes_cover_the_key_value_section(tmp_path: Path) -> None:
    """Each key/value pair's recorded size: together they fill the header from byte 24 to the first tensor info."""
    path = _write_small(tmp_path / "m.gguf")
    header = read_header(path)
    raw = path.read_bytes()
    first_info = raw.index(struct.pack("<Q", 2) + b"t0")  # the first tensor-info record starts with its name
    assert set(header.kv_bytes) == set(header.metadata)
    assert 24 + sum(header.kv_bytes.values()) == first_info
    key = "tokenizer.chat_template"
    assert header.kv_bytes[key] == 8 + len(key) + 4 + 8 + len("{{ messages }}")
    tokens = "tokenizer.ggml.tokens"
    assert header.kv_bytes[tokens] == 8 + len(tokens) + 4 + 4 + 8 + 3 * (8 + 1)


def test_tensor_sizes_are_gguf_pys() -> None:
    """One size rule for every tensor description: gguf-py's byte shape, GGUF-order shapes (ne0 first)."""
    assert tensor_nbytes((4096, 14336), GGMLQuantizationType.Q4_K) == 14336 * 4096 // 256 * 144
    assert tensor_nbytes((64,), GGMLQuantizationType.Q8_0) == 2 * 34
    assert tensor_nbytes((7, 3), GGMLQuantizationType.F16) == 42
    spec = TensorSpec("blk.3.ffn_up.weight", (256, 5), GGMLQuantizationType.Q6_K)
    assert spec.nbytes == 5 * 210 and spec.n_elements == 1280 and spec.layer == 3
    with pytest.raises(ValueError, match="not a multiple"):
        tensor_nbytes((100, 2), GGMLQuantizationType.Q8_0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"", "not a GGUF file"),
        (lambda b: b"GGML" + b[4:], "bad magic"),
        (lambda b: b[:4] + struct.pack("<I", 9) + b[8:], "version 9"),
        (lambda b: b[:8] + struct.pack("<Q", 1 << 40) + b[16:], "tensor count"),
        (lambda b: b[:16] + struct.pack("<Q", 1 << 40) + b[24:], "key/value count"),
        (lambda b: b[:24] + struct.pack("<Q", 1 << 50) + b[32:], "bytes long"),
        (lambda b: b[:200], "truncated"),
        (lambda b: b[: len(b) - 100], "past the end"),
    ],
)
def test_malformed_headers_are_refused(tmp_path: Path, mutate, message: str) -> None:
    good = _write_small(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(good))
    with pytest.raises(InvalidGGUF, match=message) as info:
        read_gguf(bad)
    assert str(bad) in str(info.value)


def test_unknown_tensor_type_and_offset_outside(tmp_path: Path) -> None:
    path = _write_small(tmp_path / "m.gguf", n_tensors=1)
    header = read_header(path)
    raw = bytearray(path.read_bytes())
    # locate the first tensor info: name "t0" then n_dims, dims, type, offset
    at = raw.index(b"t0", 24) + 2
    type_pos = at + 4 + 8 * 2
    bad_type = bytearray(raw)
    bad_type[type_pos : type_pos + 4] = struct.pack("<I", 250)
    (tmp_path / "type.gguf").write_bytes(bad_type)
    with pytest.raises(InvalidGGUF, match="unknown type 250"):
        read_gguf(tmp_path / "type.gguf")
    bad_offset = bytearray(raw)
    bad_offset[type_pos + 4 : type_pos + 12] = struct.pack("<Q", header.file_bytes * 2 // 32 * 32)
    (tmp_path / "offset.gguf").write_bytes(bad_offset)
    with pytest.raises(InvalidGGUF, match="past the end"):
        read_gguf(tmp_path / "offset.gguf")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputNotFound):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(InvalidGGUF, match="directory"):
        read_header(tmp_path)


def test_split_paths() -> None:
    assert split_paths(Path("/m/x-00002-of-00003.gguf")) == [
        Path("/m/x-00001-of-00003.gguf"),
        Path("/m/x-00002-of-00003.gguf"),
        Path("/m/x-00003-of-00003.gguf"),
    ]
    assert split_paths(Path("/m/x.gguf")) == [Path("/m/x.gguf")]
