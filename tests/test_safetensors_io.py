"""safetensors header validation, zero-copy reading, the writer and BF16 rounding."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from corral.convert.errors import InvalidSafetensors
from corral.convert.safetensors_io import (
    MAX_HEADER_BYTES,
    SafetensorsFile,
    bf16_bits_to_float32,
    float32_to_bf16_bytes,
    read_header,
    to_float32,
    write_safetensors,
)


def _raw_file(path: Path, header: dict, data: bytes, *, pad: bool = True) -> Path:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_roundtrip_matches_the_safetensors_library(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    b = np.arange(10, dtype=np.float16)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": ("F32", (4, 6), a.tobytes()), "b": ("F16", (10,), b)}, {"format": "pt"})
    theirs = load_file(str(path))
    assert np.array_equal(theirs["a"], a) and np.array_equal(theirs["b"], b)
    with SafetensorsFile(path) as f:
        assert f.header.metadata == {"format": "pt"}
        assert list(f.tensors) == ["a", "b"]
        assert np.array_equal(f.array("a"), a)
        assert f.array("b").dtype == np.float16 and np.array_equal(f.array("b"), b)
        assert bytes(f.raw("a")) == a.tobytes()
        f.release("a")  # advisory; must not break later reads
        assert np.array_equal(f.array("a"), a)


def test_reads_files_written_by_the_safetensors_library(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "lib.safetensors"
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    save_file({"z": x, "a": np.ones(7, dtype=np.int64)}, str(path))
    with SafetensorsFile(path) as f:
        assert np.array_equal(f.array("z"), x)
        assert f.tensors["a"].dtype == "I64" and f.array("a").sum() == 7


def test_bf16_rounding_matches_torch() -> None:
    import torch

    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 3,
        np.array([0.0, -0.0, 1e-40, -1e-40, 3.4e38, np.inf, -np.inf], dtype=np.float32),
        # exact ties: half-way between two bf16 values, both parities
        np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)], dtype=np.float32),
    ])
    ours = np.frombuffer(float32_to_bf16_bytes(x), dtype=np.uint16)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    nan = np.frombuffer(float32_to_bf16_bytes(np.array([np.nan], dtype=np.float32)), dtype=np.uint16)
    assert np.isnan(bf16_bits_to_float32(nan)).all()  # torch's NaN payload varies by kernel; NaN stays NaN
    back = bf16_bits_to_float32(ours[:10000])
    assert np.array_equal(back, torch.from_numpy(x[:10000]).to(torch.bfloat16).float().numpy())
    assert np.array_equal(to_float32(ours[:10000], "BF16"), back)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "before the end of the file"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "does not fit|past the end"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "want 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12, "gap"),
        ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "bad shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "bad data_offsets"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        # JSON booleans are Python ints: `true` must not pass as a dimension or an offset
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "bad shape"),
        ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0", "bad data_offsets"),
    ],
)
def test_invalid_headers_are_rejected(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InvalidSafetensors, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_header_size_cap_and_truncation(tmp_path: Path) -> None:
    cases = [("huge", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "cap"),
             ("short", struct.pack("<Q", 100) + b"{}", "past the end"),
             ("tiny", b"abc", "shorter than 8"),
             ("nj", struct.pack("<Q", 4) + b"{abc", "JSON")]
    for name, raw, message in cases:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(raw)
        with pytest.raises(InvalidSafetensors, match=message):
            read_header(path)


def test_writer_rejects_wrong_byte_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="want 8"):
        write_safetensors(tmp_path / "w.safetensors", {"a": ("F32", (2,), b"\0" * 4)})
