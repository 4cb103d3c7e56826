"""Low-disk path: HF folder -> quantized GGUF equals `convert bf16` + llama_model_quantize, byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from corral.convert import quant_types as QT
from corral.convert.errors import ImatrixRequired
from corral.convert.gguf_file import read_gguf
from corral.convert.imatrix import load_imatrix
from corral.convert.quantize import imatrix_kv_overrides
from corral.convert.stream_quantize import convert_quantized, quantize_rows
from tests.helpers.quantize import llama_quantize, write_legacy_imatrix


@pytest.fixture(scope="module")
def bf16_reference(mini_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from corral.convert.converter import convert_checkpoint

    out = tmp_path_factory.mktemp("stream-ref") / "mini-bf16.gguf"
    convert_checkpoint(mini_checkpoint, out, outtype="bf16")
    return out


@pytest.mark.slow
def test_q4_k_m_is_byte_identical(mini_checkpoint: Path, bf16_reference: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref.gguf"
    rc, log = llama_quantize(bf16_reference, ref, int(QT.file_type("Q4_K_M").ftype))
    assert rc == 0, log[-300:]
    seen: list[int] = []
    res = convert_quantized(mini_checkpoint, tmp_path / "ours.gguf", ftype="Q4_K_M", threads=2,
                            progress=lambda d, t, w="": seen.append(d))
    assert (tmp_path / "ours.gguf").read_bytes() == ref.read_bytes()
    assert res.bytes_written == ref.stat().st_size and seen[-1] == res.n_tensors
    assert res.types["output.weight"] == "Q6_K"


@pytest.mark.slow
def test_iq2_xxs_with_imatrix_is_byte_identical(mini_checkpoint: Path, bf16_reference: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    weights = {t.name: (rng.random(t.shape[0]) + 0.1).astype(np.float32)
               for t in read_gguf(bf16_reference).tensors if len(t.shape) == 2 and t.name.startswith("blk.")}
    path = write_legacy_imatrix(tmp_path / "i.dat", weights, ncall=3)
    imat = load_imatrix(path)
    ref = tmp_path / "ref.gguf"
    rc, log = llama_quantize(bf16_reference, ref, int(QT.file_type("IQ2_XXS").ftype), imatrix=imat.entries,
                             overrides=imatrix_kv_overrides(imat))
    assert rc == 0, log[-300:]
    res = convert_quantized(mini_checkpoint, tmp_path / "ours.gguf", ftype="IQ2_XXS", imatrix=path, threads=2)
    assert (tmp_path / "ours.gguf").read_bytes() == ref.read_bytes()
    assert "IQ2_XXS" in set(res.types.values())


def test_needs_imatrix_and_writes_nothing(mini_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    with pytest.raises(ImatrixRequired, match="llama-imatrix"):
        convert_quantized(mini_checkpoint, out, ftype="IQ1_S")
    assert list(tmp_path.iterdir()) == []


def test_one_ggml_loader() -> None:
    """The streaming quantizer and the converter's Q8_0 path call the same loaded ggml library."""
    from corral.convert import ggml_lib, ggml_q8

    lib = ggml_lib.ggml()
    assert ggml_lib.find_ggml() is lib
    assert ggml_q8._ggml_quantize_chunk() is lib.ggml_quantize_chunk
    rows = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    assert np.array_equal(quantize_rows(rows, T.Q8_0).reshape(2, -1), ggml_q8.quantize_q8_0_numpy(rows))


def test_quantize_rows_matches_row_by_row_and_threads() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((12, 512)).astype(np.float32)
    whole = quantize_rows(rows, T.Q4_K, threads=3)
    pieces = np.concatenate([quantize_rows(rows[i:i + 1], T.Q4_K) for i in range(12)])
    assert whole.size == 12 * 2 * 144 and np.array_equal(whole, pieces)
    with pytest.raises(ImatrixRequired):
        quantize_rows(rows, T.IQ2_XXS)
