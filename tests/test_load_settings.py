"""LoadSettings: the one contract from plan to engine; the user's flags on top of it; the flash-attention rule."""

from __future__ import annotations

import json

import pytest
from gguf import GGMLQuantizationType as T

from corral.app.runtime.setup import EngineOptions, apply_options
from corral.convert.errors import UsageError
from corral.offload import memory
from corral.offload.api import PlanOptions
from corral.offload.catalog import require
from corral.offload.load_settings import LoadSettings, kv_needs_flash_attn, resolve_flash_attn
from tests.helpers.plans import CPU_MACHINE, make_plan

BASE = LoadSettings(n_ctx=4096, n_gpu_layers=10, n_batch=2048, n_ubatch=512, n_threads=8, n_threads_batch=16,
                    kv_type="f16", flash_attn=False)


def test_kv_types_are_the_nine_llama_cpp_accepts() -> None:
    assert list(memory.KV_TYPES) == ["f16", "f32", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
    assert memory.KV_TYPES["q8_0"] is T.Q8_0 and memory.kv_type("IQ4_NL") is T.IQ4_NL
    with pytest.raises(UsageError, match="choose from f16, f32, bf16, q8_0"):
        memory.kv_type("q2_k")


@pytest.mark.parametrize("kv_type, needs", [("f16", False), ("f32", False), ("bf16", False), ("q8_0", True),
                                            ("q4_0", True), ("q4_1", True), ("iq4_nl", True), ("q5_0", True),
                                            ("q5_1", True)])
def test_flash_attention_rule(kv_type: str, needs: bool) -> None:
    assert kv_needs_flash_attn(kv_type) is needs
    assert resolve_flash_attn(kv_type, None) is True
    assert resolve_flash_attn(kv_type, None, default=False) is needs
    assert resolve_flash_attn(kv_type, True) is True
    if needs:
        with pytest.raises(UsageError, match="needs flash attention"):
            resolve_flash_attn(kv_type, False)
    else:
        assert resolve_flash_attn(kv_type, False) is False


def test_planner_uses_the_same_rule() -> None:
    shape = require("llama-3.1-8b")
    with pytest.raises(UsageError, match="needs flash attention"):
        make_plan(shape, "Q4_K_M", PlanOptions(n_ctx=4096, kv_type="q5_1", flash_attn=False))
    plain = make_plan(shape, "Q4_K_M", PlanOptions(n_ctx=4096, kv_type="bf16", flash_attn=False))
    assert plain.kv_type == "bf16" and plain.flash_attn is False
    q = make_plan(shape, "Q4_K_M", PlanOptions(n_ctx=4096, kv_type="q4_1"))
    assert q.flash_attn is True and q.llama_kwargs["type_v"] == int(T.Q4_1)
    assert q.device("CPU").kv_bytes == 32 * 4096 * 8 * 128 * 2 * 20 // 32  # q4_1: 20 bytes per 32 values


def test_no_flags_keep_the_plan() -> None:
    assert apply_options(BASE, EngineOptions()) == BASE
    assert apply_options(BASE, EngineOptions(force=True, verbose=True)) == BASE


@pytest.mark.parametrize("options, changed", [
    (EngineOptions(n_ctx=512), {"n_ctx": 512}),
    (EngineOptions(n_ctx=0), {"n_ctx": 0}),
    (EngineOptions(n_threads=3), {"n_threads": 3, "n_threads_batch": 3}),
    (EngineOptions(n_gpu_layers=-1), {"n_gpu_layers": -1}),
    (EngineOptions(n_gpu_layers=0), {"n_gpu_layers": 0}),
    (EngineOptions(use_mmap=False), {"use_mmap": False}),
    (EngineOptions(use_mlock=True), {"use_mlock": True}),
    (EngineOptions(kv_type="q8_0"), {"kv_type": "q8_0", "flash_attn": True}),
    (EngineOptions(kv_type="Q4_0"), {"kv_type": "q4_0", "flash_attn": True}),
    (EngineOptions(kv_type="bf16"), {"kv_type": "bf16"}),
    (EngineOptions(kv_type="f16"), {}),
])
def test_each_flag_changes_only_its_settings(options: EngineOptions, changed: dict[str, object]) -> None:
    after = apply_options(BASE, options)
    for name in LoadSettings.__dataclass_fields__:
        assert getattr(after, name) == changed.get(name, getattr(BASE, name)), name


def test_kv_flag_keeps_flash_attention_on_and_rejects_unknown_types() -> None:
    on = apply_options(BASE, EngineOptions(kv_type="q8_0"))
    assert apply_options(on, EngineOptions(kv_type="f16")).flash_attn is True  # a float cache keeps it as it was
    with pytest.raises(UsageError, match="unknown KV cache type"):
        apply_options(BASE, EngineOptions(kv_type="q3_k"))


def test_kwargs_and_cli_flags_derive_from_the_settings() -> None:
    split = LoadSettings(n_ctx=8192, n_gpu_layers=81, n_batch=2048, n_ubatch=512, n_threads=6, n_threads_batch=6,
                         kv_type="q8_0", flash_attn=True, use_mmap=False, use_mlock=True, use_extra_bufts=False,
                         tensor_split=(40.0, 41.0), split_mode="layer",
                         tensor_overrides=((r"blk\.(3|4)\.ffn_(up|down|gate)\.weight", "CPU"),))
    assert split.llama_kwargs == {
        "n_ctx": 8192, "n_gpu_layers": 81, "n_batch": 2048, "n_ubatch": 512, "n_threads": 6, "n_threads_batch": 6,
        "type_k": 8, "type_v": 8, "flash_attn": True, "use_mmap": False, "use_mlock": True,
        "tensor_split": [40.0, 41.0], "main_gpu": 0, "split_mode": 1}
    assert split.cli_args("m.gguf") == [
        "-m", "m.gguf", "-c", "8192", "-ngl", "81", "-b", "2048", "-ub", "512", "-t", "6", "-tb", "6", "-fa", "on",
        "-ctk", "q8_0", "-ctv", "q8_0", "-sm", "layer", "-mg", "0", "-ts", "40,41",
        "-ot", r"blk\.(3|4)\.ffn_(up|down|gate)\.weight=CPU", "--no-repack", "--no-mmap", "--mlock"]
    plain = BASE.llama_kwargs
    assert "tensor_split" not in plain and plain["type_k"] == plain["type_v"] == 1 and plain["flash_attn"] is False
    assert BASE.cli_args() == ["-c", "4096", "-ngl", "10", "-b", "2048", "-ub", "512", "-t", "8", "-tb", "16",
                               "-fa", "off"]
    with pytest.raises(ValueError):
        LoadSettings(n_ctx=1, n_gpu_layers=0, n_batch=1, n_ubatch=1, n_threads=1, n_threads_batch=1,
                     split_mode="diagonal")
    with pytest.raises(UsageError):
        LoadSettings(n_ctx=1, n_gpu_layers=0, n_batch=1, n_ubatch=1, n_threads=1, n_threads_batch=1, kv_type="q9")


def test_plan_holds_its_load_settings_and_keeps_its_json_keys() -> None:
    plan = make_plan()
    assert plan.n_ctx == plan.load.n_ctx == 1024 and plan.n_threads == plan.load.n_threads_batch == 1
    assert plan.n_gpu_layers == 0 and plan.flash_attn is False and plan.fits
    assert plan.llama_kwargs == plan.load.llama_kwargs and plan.llama_cli_args == plan.load.cli_args(None)
    data = json.loads(json.dumps(plan.to_json()))
    assert list(data) == [
        "model", "model_path", "source", "quant", "file_bytes", "n_params", "fits", "why", "n_ctx", "n_ctx_train",
        "n_gpu_layers", "n_layers", "kv_type", "flash_attn", "n_batch", "n_ubatch", "n_threads", "use_extra_bufts",
        "tensor_split", "tensor_overrides", "llama_kwargs", "llama_cli_args", "tokens_per_second",
        "prompt_tokens_per_second", "disk_stream_bytes", "devices", "warnings", "advice", "headline",
        "hardware_source", "ram_limit", "time_per_token"]
    assert data["llama_kwargs"] == plan.llama_kwargs and data["hardware_source"] == CPU_MACHINE.source
    changed = make_plan(fits=False, tensor_overrides=(("output\\.weight", "CPU"),), advice=["x"])
    assert not changed.fits and changed.advice == ("x",) and changed.tensor_overrides == (("output\\.weight", "CPU"),)
    assert changed.load.n_ctx == 1024
