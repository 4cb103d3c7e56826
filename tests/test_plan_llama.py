"""The memory model against llama.cpp's own accounting (buffer sizes it logs) and its quantizer's sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.convert.llama_family import LlamaHParams
from corral.convert.units import GiB
from corral.offload import memory
from corral.offload.api import PlanOptions, plan_model
from corral.offload.catalog import CATALOG, ModelShape
from corral.offload.hardware import Hardware, cpu_info
from corral.offload.profile import profile_from_gguf, profile_from_shape
from tests.helpers.llama_ref import (
    llama_buffers,
    quantize_real,
    quantizer_tensor_bytes,
    synth_gguf,
    tokenizer_kvs,
)

MiB = 1024**2


def this_cpu() -> Hardware:
    flags, name = cpu_info()
    return Hardware(ram_total=64 * GiB, ram_available=60 * GiB, cpu_flags=flags, cpu_name=name, source="test")


def _predicted(path: Path, n_ctx: int) -> tuple[dict[str, int], int]:
    plan = plan_model(path, PlanOptions(n_ctx=n_ctx), this_cpu())
    c = plan.device("CPU")
    parts = {"CPU_Mapped model": c.mapped_range_bytes, "CPU_REPACK model": c.repack_bytes, "CPU KV": c.kv_bytes,
             "CPU compute": c.compute_bytes, "CPU output": c.output_bytes, "AMX model": c.amx_bytes}
    return parts, sum(parts.values())


@pytest.fixture(scope="module")
def mini_q4km(mini_gguf_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_real(mini_gguf_bf16, tmp_path_factory.mktemp("q") / "mini-q4km.gguf", "Q4_K_M")


@pytest.fixture(scope="module")
def tok_kvs(mini_checkpoint: Path) -> list:
    return tokenizer_kvs(mini_checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["bf16", "q4km"])
@pytest.mark.parametrize("n_ctx", [512, 32768])
def test_cpu_bytes_match_llama_cpp_logs(which: str, n_ctx: int, mini_gguf_bf16: Path, mini_q4km: Path) -> None:
    path = mini_gguf_bf16 if which == "bf16" else mini_q4km
    real = llama_buffers(path, n_ctx=n_ctx, n_batch=2048, n_ubatch=512, flash_attn=True)
    parts, total = _predicted(path, n_ctx)
    real_total = sum(v for k, v in real.items() if k != "kv size")
    assert abs(total / real_total - 1) < 0.05, (parts, real)
    assert parts["CPU KV"] == real["CPU KV"]  # exact: n_ctx x layers x kv heads x head dim x 2 x f16
    assert abs(parts["CPU compute"] / real["CPU compute"] - 1) < 0.05
    assert abs(parts["CPU_Mapped model"] - real["CPU_Mapped model"]) < 0.01 * MiB + 0.01 * real["CPU_Mapped model"]
    flags = cpu_info()[0]
    if which == "q4km" and "avx2" in flags and not memory.has_amx(flags):  # on AMX hosts AMX takes them first
        assert parts["CPU_REPACK model"] > 0 and abs(parts["CPU_REPACK model"] - real["CPU_REPACK model"]) < 0.02 * MiB
    else:
        assert parts["CPU_REPACK model"] == real.get("CPU_REPACK model", 0)
    # AMX hosts (amx_int8 + avx512_vnni, native build): the AMX buffer as llama.cpp logs it (to 0.01 MiB)
    assert abs(parts["AMX model"] - real.get("AMX model", 0)) < 0.02 * MiB


@pytest.mark.slow
@pytest.mark.parametrize("flash_attn,n_ctx,n_ubatch", [(True, 8192, 512), (False, 4096, 256)])
def test_compute_buffer_on_real_8b_shape(tok_kvs: list, tmp_path: Path, flash_attn: bool, n_ctx: int,
                                         n_ubatch: int) -> None:
    """A sparse all-zero file with the real 8B shapes, loaded metadata-only (no_alloc): llama.cpp sizes its
    compute graph exactly as for the real model."""
    path = synth_gguf(tmp_path / "8b.gguf", CATALOG["llama-3.1-8b"], "Q4_K_M", tok_kvs)
    real = llama_buffers(path, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, no_alloc=True)
    prof = profile_from_gguf(path)
    pred = memory.compute_buffer_bytes(prof, n_ctx, n_ubatch, flash_attn)
    assert abs(pred / real["CPU compute"] - 1) < 0.05
    assert memory.kv_bytes_per_layer(prof, n_ctx) * prof.n_layer == real["kv size"]
    assert profile_from_shape(CATALOG["llama-3.1-8b"], "Q4_K_M").tensor_bytes == prof.tensor_bytes


@pytest.mark.slow
@pytest.mark.parametrize("shape", [ModelShape("a", LlamaHParams(512, 6, 8, 2, 1536)),
                                   ModelShape("b", LlamaHParams(768, 3, 12, 4, 2048, tie_embeddings=True))])
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q2_K"])
def test_target_quant_size_matches_quantizer(tok_kvs: list, tmp_path: Path, shape: ModelShape, quant: str) -> None:
    src = synth_gguf(tmp_path / "src.gguf", shape, "BF16", tok_kvs)
    real = quantizer_tensor_bytes(src, quant)
    pred = profile_from_shape(shape, quant).tensor_bytes
    assert abs(pred / real - 1) < 0.01


def test_hf_folder_and_its_gguf_profile_alike(mini_checkpoint: Path, mini_gguf_bf16: Path, tmp_path: Path) -> None:
    """The planner reads an HF folder with the converter's own config.json rules: the same hyper-parameters and
    tensor bytes as the GGUF the converter writes from it; a config the converter refuses is refused here too."""
    import json
    import shutil
    from dataclasses import replace

    from corral.convert.errors import InvalidConfig, UnsupportedModel
    from corral.offload.profile import load_profile

    from_hf, _ = load_profile(mini_checkpoint, "BF16")
    from_gguf = profile_from_gguf(mini_gguf_bf16)
    assert from_hf.source == "hf" and from_hf.hparams.n_embd == 256 and from_hf.hparams.n_head_kv == 2
    # GGUF keeps rms_eps as float32
    assert replace(from_gguf.hparams, rms_eps=1e-5) == from_hf.hparams
    assert [(t.name, t.shape, t.ggml_type) for t in sorted(from_hf.tensors, key=lambda t: t.name)] == [
        (t.name, t.shape, t.ggml_type) for t in sorted(from_gguf.tensors, key=lambda t: t.name)]
    assert from_hf.tensor_bytes == from_gguf.tensor_bytes
    bad = tmp_path / "bad"
    shutil.copytree(mini_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(InvalidConfig, match="multiple of num_key_value_heads"):
        load_profile(bad, "Q4_K_M")
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(UnsupportedModel, match="rope type"):
        load_profile(bad, "Q4_K_M")


def test_generation_touches_a_few_logit_rows_not_a_ubatch() -> None:
    """What a streaming engine reserves beside its weights: llama.cpp reserves logits for every token of a ubatch
    (~250 MiB for a 128K vocabulary at 512), but generation writes only the rows it asks for."""
    prof = profile_from_shape(CATALOG["llama-3.1-8b"], "Q4_K_M")
    worst = memory.compute_buffer_bytes(prof, 8192, 512, True)
    touched = memory.touched_compute_bytes(prof, 8192, 512, True)
    parts = memory.compute_parts(prof, 8192, 512, True)
    assert touched == max(parts["attn"], parts["ffn"]) < worst
    assert memory.touched_compute_bytes(prof, 8192, 4, True) >= (prof.n_vocab + 2 * prof.n_embd) * 4 * 4
