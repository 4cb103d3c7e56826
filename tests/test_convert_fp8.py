"""Meta's FP8 checkpoints (fbgemm_fp8): per-row dequantization into GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from corral.convert import fp8
from corral.convert.converter import convert_checkpoint
from corral.convert.errors import InvalidConfig, InvalidSafetensors
from corral.convert.gguf_file import read_gguf
from corral.convert.minimodel import MiniSpec, build_checkpoint
from corral.convert.safetensors_io import SafetensorsFile, to_float32, write_safetensors

SPEC = MiniSpec(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, shards=1)
SKIP = ("model.layers.1.mlp",)  # left in BF16, like Meta's modules_to_not_convert


def test_e4m3_table_known_values() -> None:
    table = fp8.e4m3_table()
    assert table[0x00] == 0 and table[0x38] == 1.0 and table[0xB8] == -1.0
    assert table[0x7E] == 448.0 and table[0x01] == 2.0**-9  # largest normal, smallest subnormal
    assert np.isnan(table[0x7F]) and np.isnan(table[0xFF])
    x = np.array([0.0, 1.0, -2.5, 300.0, 1000.0, 2.0**-9], dtype=np.float32)
    assert np.array_equal(fp8.e4m3_to_float32(fp8.float32_to_e4m3(x)), [0.0, 1.0, -2.5, 288.0, 448.0, 2.0**-9])


def test_e4m3_matches_torch() -> None:
    import torch

    codes = np.arange(256, dtype=np.uint8)
    theirs = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    ours = fp8.e4m3_to_float32(codes)
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.array_equal(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)])


def make_fp8_checkpoint(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A BF16 mini checkpoint rewritten as fbgemm_fp8; returns it and the hand-dequantized weights."""
    src = build_checkpoint(root / "bf16", SPEC, seed=5)
    out = root / "fp8"
    out.mkdir()
    expected: dict[str, np.ndarray] = {}
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    with SafetensorsFile(src / "model.safetensors") as st:
        for name, info in st.tensors.items():
            values = to_float32(st.array(name), info.dtype)
            quantize = name.startswith("model.layers.") and name.endswith("proj.weight") and not name.startswith(SKIP)
            if not quantize:
                tensors[name] = (info.dtype, info.shape, bytes(st.raw(name)))
                expected[name] = values
                continue
            scale = (np.abs(values).max(axis=1, keepdims=True) / 448.0).astype(np.float32)
            codes = fp8.float32_to_e4m3(values / scale)
            tensors[name] = ("F8_E4M3", info.shape, codes.tobytes())
            tensors[name + "_scale"] = ("F32", (info.shape[0], 1), scale.tobytes())
            expected[name] = fp8.e4m3_table()[codes] * scale  # by hand: float(code) * row scale
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                     "modules_to_not_convert": ["lm_head", *SKIP]}
    (out / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / f).write_bytes((src / f).read_bytes())
    return out, expected


def _gguf_f32(path: Path, name: str) -> np.ndarray:
    model = read_gguf(path)
    t = next(t for t in model.tensors if t.name == name)
    with open(t.file, "rb") as fh:
        fh.seek(t.offset)
        raw = fh.read(t.nbytes)
    return np.frombuffer(raw, dtype=np.float32).reshape(tuple(reversed(t.shape)))


def _permute(w: np.ndarray, n: int) -> np.ndarray:
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_fp8_checkpoint_dequantizes_per_row(tmp_path: Path) -> None:
    src, expected = make_fp8_checkpoint(tmp_path)
    out = tmp_path / "fp8.gguf"
    result = convert_checkpoint(src, out, outtype="f32")
    assert result.n_tensors == 1 + 2 * 9 + 3  # rope_freqs, 2 layers, embd/norm/output
    model = read_gguf(out)
    assert "blk.0.attn_q.weight_scale" not in {t.name for t in model.tensors}
    for layer in range(2):
        q = _gguf_f32(out, f"blk.{layer}.attn_q.weight")
        k = _gguf_f32(out, f"blk.{layer}.attn_k.weight")
        assert np.array_equal(q, _permute(expected[f"model.layers.{layer}.self_attn.q_proj.weight"], 4))
        assert np.array_equal(k, _permute(expected[f"model.layers.{layer}.self_attn.k_proj.weight"], 2))
        for hf, gg in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                       ("mlp.gate_proj", "ffn_gate"), ("mlp.down_proj", "ffn_down")):
            assert np.array_equal(_gguf_f32(out, f"blk.{layer}.{gg}.weight"),
                                  expected[f"model.layers.{layer}.{hf}.weight"])
    assert np.array_equal(_gguf_f32(out, "token_embd.weight"), expected["model.embed_tokens.weight"])
    # auto -> BF16 for FP8 sources; rounding the dequantized values to BF16
    auto = convert_checkpoint(src, tmp_path / "fp8-auto.gguf")
    assert auto.outtype == "bf16"
    assert read_gguf(auto.paths[0]).get("general.file_type") == 32


def test_fp8_errors(tmp_path: Path) -> None:
    src, _ = make_fp8_checkpoint(tmp_path)
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidConfig, match="FP8 but config.json"):
        convert_checkpoint(src, tmp_path / "x.gguf")
    config["quantization_config"] = {"quant_method": "fbgemm_fp8"}
    (src / "config.json").write_text(json.dumps(config))
    with SafetensorsFile(src / "model.safetensors") as st:
        kept = {n: (i.dtype, i.shape, bytes(st.raw(n))) for n, i in st.tensors.items()
                if n != "model.layers.0.mlp.up_proj.weight_scale"}
    write_safetensors(src / "model.safetensors", kept)
    with pytest.raises(InvalidSafetensors, match="no model.layers.0.mlp.up_proj.weight_scale"):
        convert_checkpoint(src, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
