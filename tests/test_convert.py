"""corral's converter on its own: validation, safety (atomic output, disk space, overwrite), rope, Q8_0, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from corral.app.cli.main import cli
from corral.convert import atomic, ggml_q8
from corral.convert import llama_family as lt
from corral.convert.converter import (
    convert_checkpoint,
    gguf_metadata,
    iter_gguf_tensors,
    open_checkpoint,
    plan_tensors,
)
from corral.convert.errors import (
    InputNotFound,
    InsufficientDisk,
    InvalidConfig,
    InvalidSafetensors,
    OutputExists,
    UnsupportedModel,
)
from corral.convert.gguf_file import read_gguf
from corral.convert.llama_family import RopeScaling
from corral.convert.minimodel import MiniSpec, build_checkpoint

SMALL = MiniSpec(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("small") / "Small-Model", SMALL, seed=1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".gguf", ".corral-tmp") or "corral-tmp" in p.name)


def test_convert_writes_a_valid_gguf(small_ckpt: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    result = convert_checkpoint(small_ckpt, tmp_path / "m.gguf", outtype="bf16", progress=lambda d, t, w="": calls.append((d, t)))
    model = read_gguf(result.paths[0])
    assert result.paths == (tmp_path / "m.gguf",) and result.bytes_written == (tmp_path / "m.gguf").stat().st_size
    assert model.architecture == "llama" and len(model.tensors) == result.n_tensors == 1 + 2 * 9 + 3
    assert model.get("llama.attention.head_count_kv") == 2 and model.get("llama.rope.dimension_count") == 16
    assert model.get("tokenizer.ggml.pre") == "llama-bpe" and len(model.get("tokenizer.ggml.tokens")) == 128256
    types = {t.name: t.ggml_type.name for t in model.tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.ffn_norm.weight"] == "F32"
    assert calls[-1][0] == calls[-1][1] > 0 and all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert _leftovers(tmp_path) == ["m.gguf"]


def test_metadata_and_tensors_api(small_ckpt: Path) -> None:
    ckpt = open_checkpoint(small_ckpt)
    kvs = gguf_metadata(ckpt, "q8_0")
    keys = [k for k, _, _ in kvs]
    assert keys[0] == "general.architecture" and "tokenizer.chat_template" in keys
    assert dict((k, v) for k, v, _ in kvs)["general.file_type"] == 7
    plans = plan_tensors(ckpt, "q8_0")
    outs = list(iter_gguf_tensors(ckpt, "q8_0"))
    assert [o.name for o in outs] == [p.name for p in plans]
    assert outs[0].name == "rope_freqs.weight" and outs[0].ggml_type.name == "F32"
    q = next(o for o in outs if o.name == "blk.1.ffn_up.weight")
    assert q.ggml_type.name == "Q8_0" and q.data.nbytes == 128 * 64 // 32 * 34 and q.shape_gguf == (64, 128)
    f32 = next(o for o in iter_gguf_tensors(ckpt, "f32") if o.name == "blk.1.ffn_up.weight").as_float32()
    assert f32.shape == (128, 64)
    assert np.abs(q.as_float32() - f32).max() <= np.abs(f32).max() / 127  # within one Q8_0 step


def test_q_k_permutation_matches_llama_cpp_formula(small_ckpt: Path) -> None:
    from corral.convert.safetensors_io import SafetensorsFile, to_float32

    ckpt = open_checkpoint(small_ckpt)
    info = ckpt.tensors["model.layers.0.self_attn.k_proj.weight"]
    with SafetensorsFile(info.file) as st:
        w = to_float32(st.array(info.name), info.dtype)
    expected = w.reshape(2, 2, w.shape[0] // 2 // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
    got = next(o for o in iter_gguf_tensors(ckpt, "f32") if o.name == "blk.0.attn_k.weight").as_float32()
    assert np.array_equal(got, expected) and not np.array_equal(got, w)


def test_permute_rows_in_chunks_equals_whole() -> None:
    w = np.arange(8 * 16 * 3, dtype=np.uint16).reshape(8 * 16, 3)
    whole = lt.permute_rows(w, 8)
    parts = np.concatenate([lt.permute_rows(w[i : i + 32], 2) for i in range(0, 128, 32)])
    assert np.array_equal(whole, parts)


@pytest.mark.parametrize(("head_dim", "theta", "orig"), [(128, 500000.0, 8192), (64, 500000.0, 8192),
                                                         (16, 500000.0, 8192), (32, 10000.0, 64)])
def test_rope_freqs_match_llama_cpp_torch_formula(head_dim: int, theta: float, orig: int) -> None:
    import math

    import torch

    s = RopeScaling(8.0, 1.0, 4.0, orig)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low, high = orig / s.low_freq_factor, orig / s.high_freq_factor
    factors = []
    for freq in freqs:  # the formula of llama.cpp's conversion/llama.py, evaluated with torch
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            factors.append(1)
        elif wavelen > low:
            factors.append(s.factor)
        else:
            smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    expected = torch.tensor(factors, dtype=torch.float32).numpy()
    ours = lt.rope_freq_factors(head_dim, theta, s)
    assert ours.tobytes() == expected.tobytes()
    assert ours[0] == 1.0 and ours[-1] == 8.0


def test_native_q8_0_matches_numpy_port() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = 0.5  # exact .5 after scaling? (127/0.5 * 0.5)
    x[2] *= 1e-30
    assert ggml_q8.native_available()
    assert ggml_q8.quantize_q8_0(x).tobytes() == ggml_q8.quantize_q8_0_numpy(x).tobytes()
    from gguf import GGMLQuantizationType, quants

    assert ggml_q8.quantize_q8_0(x).tobytes() == quants.quantize(x, GGMLQuantizationType.Q8_0).tobytes()


def test_refuses_to_overwrite_and_force_replaces(small_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExists):
        convert_checkpoint(small_ckpt, out, outtype="f16")
    assert out.read_bytes() == b"precious"
    convert_checkpoint(small_ckpt, out, outtype="f16", force=True)
    assert read_gguf(out).get("general.file_type") == 1


def test_disk_space_is_checked_first(small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientDisk, match=r"need [\d,]+ bytes, 1,000 free"):
        convert_checkpoint(small_ckpt, tmp_path / "m.gguf")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_nothing(small_ckpt: Path, tmp_path: Path, exc: type[BaseException]) -> None:
    def boom(done: int, total: int, what: str = "") -> None:
        if done > total // 2:
            raise exc("stop")

    with pytest.raises(exc):
        convert_checkpoint(small_ckpt, tmp_path / "m.gguf", outtype="f32", progress=boom)
    with pytest.raises(exc):
        convert_checkpoint(small_ckpt, tmp_path / "s.gguf", outtype="f32", split_max_size=10**6, progress=boom)
    assert _leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_writer_misuse_is_a_bug_not_a_user_error(tmp_path: Path) -> None:
    """The streaming writer's call-order checks raise plain RuntimeErrors (never CorralError) and leave nothing."""
    from gguf import GGMLQuantizationType, GGUFValueType

    from corral.convert.errors import CorralError
    from corral.convert.gguf_writer import GGUFStreamWriter
    from corral.convert.tensor_specs import TensorSpec

    kvs = [("general.architecture", "llama", GGUFValueType.STRING)]
    specs = [TensorSpec("a", (8,), GGMLQuantizationType.F32), TensorSpec("b", (4, 2), GGMLQuantizationType.F16)]
    misuses = [
        lambda w: w.write(b"x"),
        lambda w: w.end_tensor(),
        lambda w: w.begin_tensor("b"),
        lambda w: (w.begin_tensor("a"), w.begin_tensor("b")),
        lambda w: (w.begin_tensor("a"), w.write(bytes(33))),
        lambda w: (w.begin_tensor("a"), w.write(bytes(31)), w.end_tensor()),
        lambda w: None,  # closed before every tensor was written
    ]
    for misuse in misuses:
        with pytest.raises(RuntimeError) as info:
            with GGUFStreamWriter(tmp_path / "m.gguf", kvs, specs) as writer:
                misuse(writer)
        assert not isinstance(info.value, CorralError)
        assert list(tmp_path.iterdir()) == []
    with GGUFStreamWriter(tmp_path / "m.gguf", kvs, specs) as writer:
        for spec in specs:
            writer.begin_tensor(spec.name)
            writer.write(bytes(spec.nbytes))
            writer.end_tensor()
    assert [t.nbytes for t in read_gguf(tmp_path / "m.gguf").tensors] == [32, 16]


def test_split_names_and_keys(small_ckpt: Path, tmp_path: Path) -> None:
    result = convert_checkpoint(small_ckpt, tmp_path / "m.gguf", outtype="f32", split_max_size=20 * 10**6)
    n = len(result.paths)
    assert n >= 2 and [p.name for p in result.paths] == [f"m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    model = read_gguf(result.paths[0])
    assert len(model.files) == n and model.get("split.count") == n and model.get("split.no") == 0
    assert len(model.tensors) == result.n_tensors == model.get("split.tensors.count")
    assert not (tmp_path / "m.gguf").exists()


def test_validation_errors(small_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(InputNotFound):
        convert_checkpoint(tmp_path / "missing", tmp_path / "o.gguf")
    bad = _copy(small_ckpt, tmp_path / "arch")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(UnsupportedModel, match="MistralForCausalLM") as info:
        convert_checkpoint(bad, tmp_path / "o.gguf")
    assert "config.json" in str(info.value)
    (bad / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(InvalidConfig, match="multiple of num_key_value_heads"):
        convert_checkpoint(bad, tmp_path / "o.gguf")
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(InvalidSafetensors, match="config.json implies"):
        convert_checkpoint(bad, tmp_path / "o.gguf")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(InvalidConfig, match="not valid JSON"):
        convert_checkpoint(bad, tmp_path / "o.gguf")
    notok = _copy(small_ckpt, tmp_path / "notok")
    (notok / "tokenizer.json").unlink()
    with pytest.raises(InvalidConfig, match="tokenizer.json is missing"):
        convert_checkpoint(notok, tmp_path / "o.gguf")
    trunc = _copy(small_ckpt, tmp_path / "trunc")
    shard = sorted(trunc.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(InvalidSafetensors, match="past the end") as info:
        convert_checkpoint(trunc, tmp_path / "o.gguf")
    assert shard.name in str(info.value)
    assert _leftovers(tmp_path) == []


def test_cli_convert(small_ckpt: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "c.gguf"
    res = runner.invoke(cli, ["convert", str(small_ckpt), "-o", str(out), "--outtype", "q8_0", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["paths"] == [str(out)] and payload["outtype"] == "q8_0" and payload["bytes"] == out.stat().st_size
    res = runner.invoke(cli, ["convert", str(small_ckpt), "-o", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(cli, ["convert", str(tmp_path / "nope"), "-o", str(out), "--force"])
    assert res.exit_code == 2 and "no such checkpoint folder" in res.output
    res = runner.invoke(cli, ["convert", str(small_ckpt), "-o", str(out), "--split-max-size", "ten"])
    assert res.exit_code == 2 and "not a size" in res.output
    res = runner.invoke(cli, ["convert", str(small_ckpt), "-o", str(out), "--imatrix", "x.dat"])
    assert res.exit_code == 2 and "--imatrix only applies with --quant" in res.output
