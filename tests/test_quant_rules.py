"""quant_rules against llama.cpp: the per-tensor types it really picks and the sizes it really writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from corral.convert import quant_rules as R
from corral.convert import quant_types as QT
from corral.convert.errors import UnsupportedModel, UsageError
from corral.convert.gguf_file import read_gguf
from corral.convert.llama_family import LlamaHParams, gguf_tensor_specs
from tests.helpers.quantize import Shape, llama_dry_run_types, llama_quantize, random_imatrix, write_mini_gguf

SHAPES = {
    # K/IQ-friendly rows, grouped-query attention (n_gqa = 4), 8 layers (use_more_bits pattern)
    "gqa4-8L": Shape(hidden=256, n_layers=8, n_heads=8, n_kv_heads=2, ffn=512),
    # rows of 288 and 480: not multiples of 256 -> fallbacks; no GQA; 9 layers
    "odd-9L": Shape(hidden=288, n_layers=9, n_heads=8, n_kv_heads=8, ffn=480),
    # tied embeddings (no output.weight), 16 layers, n_gqa = 2
    "tied-16L": Shape(hidden=256, n_layers=16, n_heads=4, n_kv_heads=2, ffn=768, tied=True),
    # rows of 160: a multiple of 32 only
    "narrow-3L": Shape(hidden=160, n_layers=3, n_heads=5, n_kv_heads=1, ffn=320),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quant-rules")
    return {key: write_mini_gguf(folder / f"{key}.gguf", shape, seed=i) for i, (key, shape) in enumerate(SHAPES.items())}


def _specs(path: Path) -> list[R.TensorSpec]:
    return [R.TensorSpec(t.name, t.shape, t.ggml_type) for t in read_gguf(path).tensors]


def _predict(path: Path, ftype: F, has_imatrix: bool) -> dict[str, str] | str:
    try:
        return {k: v.name for k, v in R.target_types(_specs(path), ftype, has_imatrix=has_imatrix).items()}
    except UnsupportedModel:
        return "refused"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("has_imatrix", [False, True])
def test_types_match_llama_dry_run_for_every_file_type(models: dict[str, Path], shape: str, has_imatrix: bool) -> None:
    path = models[shape]
    imatrix = random_imatrix(SHAPES[shape]) if has_imatrix else None
    compared = 0
    for info in QT.all_file_types():
        predicted = _predict(path, info.ftype, has_imatrix)
        try:
            actual: dict[str, str] | str = llama_dry_run_types(path, int(info.ftype), imatrix=imatrix)
        except AssertionError as exc:  # llama.cpp refused (no fallback for the type on these rows)
            assert "no tensor type fallback" in str(exc)
            actual = "refused"
        assert predicted == actual, f"{info.name} on {shape}"
        compared += 1
    assert compared == len(QT.all_file_types()) >= 30


REAL_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_L", "Q2_K", "IQ4_XS", "Q4_0", "TQ1_0"]


@pytest.mark.parametrize(("shape", "names"), [("gqa4-8L", REAL_TYPES), ("odd-9L", REAL_TYPES),
                                              ("tied-16L", ["Q6_K", "Q4_K_M", "Q2_K"])])
def test_real_output_types_and_size(models: dict[str, Path], shape: str, names: list[str], tmp_path: Path) -> None:
    path = models[shape]
    specs = _specs(path)
    meta = _kv_bytes(path)
    for name in names:
        info = QT.file_type(name)
        out = tmp_path / f"{name}.gguf"
        rc, log = llama_quantize(path, out, int(info.ftype))
        assert rc == 0, log[-500:]
        written = read_gguf(out)
        assert {t.name: t.ggml_type for t in written.tensors} == R.target_types(specs, name), name
        predicted = R.predict_file_bytes(specs, name, meta)
        assert abs(predicted - out.stat().st_size) <= 0.01 * out.stat().st_size, name
        assert predicted == out.stat().st_size, name  # in fact exact: same header, same padding


def test_real_output_iq_types_with_imatrix(tmp_path: Path) -> None:
    shape = Shape(hidden=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn=256, vocab=256)
    path = write_mini_gguf(tmp_path / "small.gguf", shape)
    specs = _specs(path)
    imatrix = random_imatrix(shape)
    for name in ["IQ2_XXS", "IQ1_M", "Q2_K_S"]:
        out = tmp_path / f"{name}.gguf"
        rc, log = llama_quantize(path, out, int(QT.file_type(name).ftype), imatrix=imatrix)
        assert rc == 0, log[-500:]
        types = {t.name: t.ggml_type for t in read_gguf(out).tensors}
        assert types == R.target_types(specs, name, has_imatrix=True), name
        assert R.predict_file_bytes(specs, name, _kv_bytes(path), has_imatrix=True) == out.stat().st_size


def _kv_bytes(path: Path) -> int:
    """Header + KV bytes of the quantized file: the input's, with file_type/quantization_version u32."""
    from corral.convert.gguf_file import read_header

    sizes = dict(read_header(path).kv_bytes)
    sizes.pop("general.file_type", None)
    sizes.pop("general.quantization_version", None)
    return 24 + sum(sizes.values()) + (8 + 17 + 8) + (8 + 28 + 8)


# ------------------------------------------------------------------ rules on real model shapes


def _llama(n_layers: int, hidden: int, heads: int, kv: int, ffn: int) -> list[R.TensorSpec]:
    return gguf_tensor_specs(LlamaHParams(n_embd=hidden, n_layer=n_layers, n_head=heads, n_head_kv=kv, n_ff=ffn))


def test_q4_k_m_uses_more_bits_on_first_last_and_every_third_layer_8b() -> None:
    types = R.target_types(_llama(32, 4096, 32, 8, 14336), "Q4_K_M")
    six = [i for i in range(32) if types[f"blk.{i}.ffn_down.weight"] == T.Q6_K]
    # n/8 = 4: layers 0-3, 28-31, and (i - 4) % 3 == 2 in between
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K] == six
    assert types["blk.5.ffn_down.weight"] == T.Q4_K
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert types["blk.0.attn_norm.weight"] == T.F32 and types["rope_freqs.weight"] == T.F32


def test_70b_gets_q5_k_attn_v_and_405b_does_not() -> None:
    t70 = R.target_types(_llama(80, 8192, 64, 8, 28672), "Q3_K_S")
    assert t70["blk.40.attn_v.weight"] == T.Q5_K  # LLM_TYPE_70B bump of Q3_K/Q4_K
    t405 = R.target_types(_llama(126, 16384, 128, 8, 53248), "Q2_K")
    assert t405["blk.40.attn_v.weight"] == T.Q4_K  # n_gqa >= 4
    assert t405["blk.40.ffn_down.weight"] == T.Q3_K and t405["blk.40.attn_output.weight"] == T.Q3_K
    assert t405["blk.40.ffn_up.weight"] == T.Q2_K


def test_iq_mixes_and_imatrix_needs() -> None:
    specs = _llama(32, 4096, 32, 8, 14336)
    t = R.target_types(specs, "IQ2_XXS", has_imatrix=True)
    assert t["token_embd.weight"] == T.Q2_K and t["output.weight"] == T.Q5_K
    assert t["blk.0.ffn_down.weight"] == T.Q2_K and t["blk.10.ffn_down.weight"] == T.IQ2_XXS
    assert t["blk.10.attn_v.weight"] == T.Q4_K
    assert R.tensors_needing_imatrix(specs, "IQ2_XXS")
    assert not R.tensors_needing_imatrix(specs, "Q4_K_M")
    assert not R.tensors_needing_imatrix(specs, "IQ3_S")
    assert R.tensors_needing_imatrix(specs, "Q2_K_S")
    # IQ3_XXS: attn_v depends on whether an imatrix is given when n_gqa < 4
    mha = _llama(8, 4096, 32, 32, 11008)
    assert R.target_types(mha, "IQ3_XXS")["blk.3.attn_v.weight"] == T.IQ3_S
    assert R.target_types(mha, "IQ3_XXS", has_imatrix=True)["blk.3.attn_v.weight"] == T.IQ3_XXS


def test_shape_fallbacks() -> None:
    odd = [R.TensorSpec("blk.0.ffn_down.weight", (288, 64), T.BF16),
           R.TensorSpec("blk.0.ffn_up.weight", (100, 64), T.BF16)]
    assert R.target_types(odd, "Q4_K_S")["blk.0.ffn_down.weight"] == T.Q5_0  # 288 % 256, 288 % 32 == 0
    assert R.target_types(odd, "Q6_K")["blk.0.ffn_down.weight"] == T.Q8_0
    assert R.target_types(odd, "IQ4_XS")["blk.0.ffn_down.weight"] == T.IQ4_NL
    assert R.target_types(odd, "Q4_K_M")["blk.0.ffn_up.weight"] == T.F16  # not even a multiple of 32
    with pytest.raises(UnsupportedModel):
        R.target_types(odd, "Q1_0")


def test_names_sizes_and_errors() -> None:
    assert R.ftype_from_name("q4_k") == F.MOSTLY_Q4_K_M
    assert R.default_tensor_type("IQ2_S") == T.IQ2_XS and R.default_tensor_type("IQ3_XS") == T.IQ3_S
    with pytest.raises(UsageError):
        R.ftype_from_name("Q9_K")
    with pytest.raises(UsageError):
        R.default_tensor_type("NVFP4")
    block, size = GGML_QUANT_SIZES[T.Q4_K]
    assert R.tensor_nbytes((4096, 14336), T.Q4_K) == 14336 * 4096 // block * size
    with pytest.raises(ValueError, match="not a multiple of Q4_K"):
        R.tensor_nbytes((100, 4), T.Q4_K)
    assert R.n_dims((4096, 1)) == 1 and R.n_dims((4096, 8, 1)) == 2


def test_405b_q2_k_prediction_is_plausible() -> None:
    specs = _llama(126, 16384, 128, 8, 53248)
    size = R.predict_file_bytes(specs, "Q2_K", 10_000_000)
    n = sum(s.shape[0] * (s.shape[1] if len(s.shape) > 1 else 1) for s in specs)
    assert 405e9 < n < 407e9
    assert 2.9 < size * 8 / n < 3.1  # Q2_K mixes Q3_K/Q4_K/Q6_K in: ~3.0 bits per weight
