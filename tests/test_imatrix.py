"""Importance matrix files: both llama.cpp formats, normalisation, validation."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from corral.convert.errors import InputNotFound, InvalidFile
from corral.convert.imatrix import LlamaImatrixData, load_imatrix
from tests.helpers.quantize import write_gguf_imatrix, write_legacy_imatrix


def _means() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"blk.0.attn_q.weight": rng.random(256, dtype=np.float32) + 0.1,
            "blk.0.ffn_down.weight": rng.random(512, dtype=np.float32) + 0.1}


def test_legacy_dat_is_divided_by_ncall(tmp_path: Path) -> None:
    means = _means()
    imat = load_imatrix(write_legacy_imatrix(tmp_path / "i.dat", means, ncall=7))
    assert imat.format == "legacy" and len(imat) == 2
    assert imat.chunk_count == 7 and imat.datasets == ("wiki.train.raw",)
    for name, mean in means.items():
        expected = (mean * np.float32(7)).astype(np.float32) / np.float32(7)
        np.testing.assert_array_equal(imat.get(name), expected)
        assert imat.get(name).dtype == np.float32


def test_legacy_without_trailer(tmp_path: Path) -> None:
    imat = load_imatrix(write_legacy_imatrix(tmp_path / "i.dat", _means(), ncall=1, dataset=None))
    assert imat.chunk_count == 0 and imat.datasets == ()


def test_gguf_is_divided_by_counts_per_expert(tmp_path: Path) -> None:
    sums = {"blk.0.ffn_up_exps.weight": np.arange(1, 13, dtype=np.float32),  # 3 experts x 4 columns
            "blk.0.attn_k.weight": np.full(8, 6.0, dtype=np.float32)}
    counts = {"blk.0.ffn_up_exps.weight": np.array([2, 0, 4], dtype=np.float32),
              "blk.0.attn_k.weight": np.array([3.0], dtype=np.float32)}
    imat = load_imatrix(write_gguf_imatrix(tmp_path / "i.gguf", sums, counts))
    assert imat.format == "gguf" and imat.chunk_count == 12 and imat.datasets == ("calib.txt",)
    np.testing.assert_array_equal(imat.get("blk.0.ffn_up_exps.weight"),
                                  [0.5, 1, 1.5, 2, 1, 1, 1, 1, 2.25, 2.5, 2.75, 3])  # zero count -> ones
    np.testing.assert_array_equal(imat.get("blk.0.attn_k.weight"), np.full(8, 2.0))
    assert imat.for_tensor("blk.0.ffn_up_exps.weight", 4, 3) is not None
    with pytest.raises(InvalidFile, match="different model"):
        imat.for_tensor("blk.0.attn_k.weight", 16)


def test_gguf_sums_without_counts_is_refused(tmp_path: Path) -> None:
    path = write_gguf_imatrix(tmp_path / "i.gguf", {"a.weight": np.ones(4, np.float32)},
                              {"a.weight": np.ones(1, np.float32)}, with_counts=False)
    with pytest.raises(InvalidFile, match="without counts"):
        load_imatrix(path)


@pytest.mark.parametrize("blob, message", [
    (struct.pack("<i", 0), "bad entry count"),
    (struct.pack("<i", 1) + struct.pack("<i", 20) + b"ab" + b"\0" * 10, "truncated"),
    (struct.pack("<i", 1) + struct.pack("<i", 1) + b"a" + struct.pack("<ii", 1, 0), "0 values"),
    (struct.pack("<i", 1) + struct.pack("<i", 1) + b"a" + struct.pack("<ii", 1, 100) + b"\0" * 40, "truncated"),
    (struct.pack("<i", 1) + struct.pack("<i", -4) + b"\0" * 12, "name of -4 bytes"),
    (b"\x01", "truncated"),
    (struct.pack("<i", 1000), "bad entry count"),
])
def test_malformed_legacy_files(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "bad.dat"
    path.write_bytes(blob)
    with pytest.raises(InvalidFile, match=message) as err:
        load_imatrix(path)
    assert str(path) in str(err.value)


def test_non_finite_and_missing(tmp_path: Path) -> None:
    bad = {"blk.0.attn_q.weight": np.array([1.0, np.nan], dtype=np.float32)}
    with pytest.raises(InvalidFile, match="non-finite"):
        load_imatrix(write_legacy_imatrix(tmp_path / "n.dat", bad, ncall=1))
    with pytest.raises(InputNotFound):
        load_imatrix(tmp_path / "nope.dat")
    model_like = write_gguf_imatrix(tmp_path / "m.gguf", {}, {})
    with pytest.raises(InvalidFile, match="no importance-matrix entries"):
        load_imatrix(model_like)


def test_llama_imatrix_data_array(tmp_path: Path) -> None:
    imat = load_imatrix(write_legacy_imatrix(tmp_path / "i.dat", _means(), ncall=2))
    data = LlamaImatrixData(imat)
    assert data.count == 2
    assert data.array[0].name == b"blk.0.attn_q.weight" and data.array[0].size == 256
    assert abs(data.array[0].data[5] - float(imat.get("blk.0.attn_q.weight")[5])) < 1e-7
    assert data.array[2].name is None  # terminator
