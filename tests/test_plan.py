"""The planner on real shapes (catalog) and simulated hardware: placement, context fit, speed, flags."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from corral.convert.errors import UsageError
from corral.convert.units import GiB
from corral.offload import memory
from corral.offload.api import PlanOptions, best_quant, plan_model
from corral.offload.cpu_rates import TYPICAL_AVX2, CpuRates, Overhead, TypeRate
from corral.offload.gpus import parse_gpu_spec
from corral.offload.hardware import GPU, Hardware, what_if

AVX2 = frozenset({"avx2", "fma", "f16c"})


def machine(*gpus_gib: float, ram_gib: float = 128, disk: float = 3e9, flags: frozenset[str] = AVX2) -> Hardware:
    gpus = tuple(GPU(i, f"sim{i}", int(g * GiB), int(g * GiB), 900e9, True) for i, g in enumerate(gpus_gib))
    return Hardware(gpus=gpus, ram_total=int(ram_gib * GiB), ram_available=int(ram_gib * GiB * 0.9),
                    cpu_cores=16, cpu_threads=32, cpu_flags=flags, ram_bandwidth=60e9, disk_bandwidth=disk,
                    bandwidth_measured=True, source="test")


def llama_cpp_layer_devices(n_layer: int, n_gpu_layers: int, tensor_split: list[float]) -> list[int]:
    """llama.cpp's own mapping (llama-model.cpp load_tensors) of layers 0..n_layer (n_layer = output) to a
    device index, -1 for CPU, in float32 as it does it."""
    splits = np.cumsum(np.array(tensor_split, dtype=np.float32), dtype=np.float32)
    splits = (splits / splits[-1]).astype(np.float32)
    start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    out = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append(-1)
        else:
            out.append(int(np.searchsorted(splits, np.float32((il - start) / act), side="right")))
    return out


@pytest.mark.parametrize("gpus", [(24,), (24, 12), (24, 16, 8), (48, 24, 24, 12)])
def test_multi_gpu_balance_matches_llama_cpp(gpus: tuple[float, ...]) -> None:
    hw = machine(*gpus)
    p = plan_model("llama-3.1-70b", PlanOptions(quant="Q4_K_M", n_ctx=8192), hw)
    assert p.fits
    gpu_devs = [d for d in p.devices if d.kind == "gpu"]
    assert all(d.total_bytes <= d.capacity_bytes for d in gpu_devs)
    assert sum(p.tensor_split) == p.n_gpu_layers
    assert p.llama_kwargs["tensor_split"] == list(p.tensor_split)
    # llama.cpp, given our n_gpu_layers and tensor_split, puts exactly our layer counts on each GPU
    mapping = llama_cpp_layer_devices(80, p.n_gpu_layers, list(p.tensor_split))
    for g, d in enumerate(gpu_devs):
        on_g = sum(1 for il in range(80) if mapping[il] == g)
        assert on_g == d.layers + d.attn_layers
    # balanced by free memory: each used GPU is filled to a similar fraction
    used = [d.total_bytes / d.capacity_bytes for d in gpu_devs if d.layers]
    if sum(gpus) * GiB > 45 * GiB:  # whole model on GPUs: spread, not packed into the first card
        assert max(used) - min(used) < 0.35
    if len(gpus) == 1:
        assert p.n_gpu_layers < 81 and p.device("CPU").layers > 0  # 40 GB of weights, 24 GiB card


def test_full_offload_and_cpu_repack_rules() -> None:
    p = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M", n_ctx=8192), machine(24))
    assert p.n_gpu_layers == 33 and p.fits and p.device("CPU").layers == 0
    assert p.device("CPU").repack_bytes == 0  # a GPU build keeps CPU weights mapped: no repack
    cpu = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M", n_ctx=8192), machine())
    assert cpu.n_gpu_layers == 0 and cpu.device("CPU").repack_bytes > 2 * GiB  # Q4_K tensors on AVX2
    plain = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M", n_ctx=8192), machine(flags=frozenset()))
    assert plain.device("CPU").repack_bytes == 0


def test_attention_only_layers_use_leftover_vram() -> None:
    # 405B IQ2_XXS: a layer is ~0.8 GiB; whatever room is left after whole layers takes attention + KV
    hw = machine(24)
    p = plan_model("llama-3.1-405b", PlanOptions(quant="IQ2_XXS", n_ctx=8192), hw)
    g = p.device("GPU0")
    assert g.layers > 10 and g.total_bytes <= g.capacity_bytes
    if g.attn_layers:
        regex, dev = p.tensor_overrides[0]
        assert dev == "CPU" and regex.startswith(r"blk\.(") and "ffn_" in regex
        assert any(a.startswith(regex) for a in p.llama_cli_args)
        assert p.n_gpu_layers == g.layers + g.attn_layers + 1
    # a GPU with room for exactly some attention blocks but few whole layers
    hw2 = machine(6)
    p2 = plan_model("llama-3.1-405b", PlanOptions(quant="IQ2_XXS", n_ctx=4096), hw2)
    g2 = p2.device("GPU0")
    assert g2.attn_layers > 0 and p2.tensor_overrides
    assert g2.total_bytes <= g2.capacity_bytes
    layers_in_regex = p2.tensor_overrides[0][0].split("(")[1].split(")")[0].split("|")
    assert len(layers_in_regex) == g2.attn_layers


def test_disk_streaming_is_loud() -> None:
    p = plan_model("llama-3.1-405b", PlanOptions(quant="Q4_K_M", n_ctx=4096), machine(ram_gib=64, disk=3e9))
    assert p.fits and p.disk_stream_bytes > 150 * GiB
    disk = p.device("disk")
    assert disk is not None and disk.weights_bytes == p.disk_stream_bytes
    assert any("EVERY token" in w for w in p.warnings)
    assert p.tokens_per_second < 3e9 / p.disk_stream_bytes * 1.01
    assert "--no-repack" in p.llama_cli_args and not p.use_extra_bufts  # repacked copies could not stream
    assert "streamed from disk" in p.headline


def test_disk_waits_only_while_few_slices_stream() -> None:
    """The streaming engine spreads streamed slices over the token and reads ahead of each stretch of resident
    layers only as far as its room holds: with few slices and long stretches the disk waits (the part of the
    stretch its room does not cover); with a slice in most layers it never does."""
    from corral.offload.catalog import require
    from corral.offload.profile import profile_from_shape
    from corral.offload.throughput import stream_idle_seconds

    prof = profile_from_shape(require("llama-3.1-8b"), "F16")
    total = sum(t.nbytes for t in prof.tensors if t.kind != "embd")
    unit = total // (prof.n_layer + 1)
    step = memory.largest_stream_step(prof.tensors)
    assert unit / 4 < step < unit / 2  # an FFN matrix: about a third of a layer
    room = memory.stream_window(step, total, 2 * step)
    assert room == step  # the room holds the step computing
    two = 2 * room  # two slices as big as the room
    assert memory.stream_slices(two, prof.n_layer + 1, room) == 2
    few = stream_idle_seconds(prof, total - two, two, 1.0, 2e9)
    assert few == pytest.approx(1.0 - 2 * room / 2e9)  # two stretches, each hiding one room's read
    assert stream_idle_seconds(prof, total - two, two, 0.1, 2e9) == 0.0  # short stretches: none
    # most of every layer streams: a slice of each, 33 stretches, each a room ahead
    many = 20 * unit
    assert memory.stream_slices(many, prof.n_layer + 1, memory.stream_window(step, total, many)) == prof.n_layer + 1
    assert stream_idle_seconds(prof, total - many, many, 1.0, 2e9) == 0.0


def test_cgroup_streaming_counts_what_generation_writes() -> None:
    """In a memory cgroup the plan predicts what the streaming engine does: room beside what loading writes (not
    llama.cpp's reserved-but-untouched logits for a whole ubatch), the rest streamed plus the read-ahead room."""
    hw = replace(machine(ram_gib=64), ram_available=60 * GiB, ram_limit="cgroup v1 /corral")
    opts = PlanOptions(quant="Q2_K", n_ctx=8192)
    in_group = plan_model("llama-3.1-405b", opts, hw)
    assert in_group.disk_stream_bytes > 0
    cpu = in_group.device("CPU")
    assert cpu is not None
    mapped = cpu.weights_bytes + in_group.disk_stream_bytes  # resident + streamed (+ the embedding, ~1.6 GiB)
    window = memory.stream_window(mapped // 127, mapped, 30 * GiB)  # tens of GiB missing: two layers
    # less the vocabulary and repacked weights (written) and the margin; the activations are tested below
    room = (60 * GiB - cpu.kv_bytes - cpu.repack_bytes - 128256 * memory.VOCAB_HEAP_PER_TOKEN
            - memory.STREAM_MARGIN)
    assert abs(in_group.disk_stream_bytes - (mapped - room + window)) < 3 * GiB
    assert in_group.disk_stream_bytes < mapped - (room - cpu.compute_bytes) + window  # not the reserved logits
    roomy = plan_model("llama-3.1-8b", opts, hw)  # fits: nothing streams
    assert roomy.disk_stream_bytes == 0


def test_context_autofit() -> None:
    big = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M"), machine(ram_gib=128))
    assert big.n_ctx == 131072 and big.fits and not big.disk_stream_bytes
    small = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M"), machine(ram_gib=16))
    assert 4096 <= small.n_ctx < 131072 and small.fits and not small.disk_stream_bytes
    assert small.n_ctx % 256 == 0
    # on a GPU the context grows only while every layer stays on the GPU
    g = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M"), machine(8))
    assert g.n_gpu_layers == 33 and g.n_ctx > 4096
    tight = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M", n_ctx=g.n_ctx + 8192), machine(8))
    assert tight.n_gpu_layers < 33


def test_context_cut_to_model_limit_and_kv_types() -> None:
    p = plan_model("llama-3.2-1b", PlanOptions(quant="Q8_0", n_ctx=500_000), machine())
    assert p.n_ctx == 131072 and any("context cut" in w for w in p.warnings)
    f16 = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M", n_ctx=8192), machine())
    q8 = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M", n_ctx=8192, kv_type="q8_0"), machine())
    assert f16.device("CPU").kv_bytes == 32 * 8192 * 8 * 128 * 2 * 2  # n_layer x ctx x kv heads x dim x K,V x f16
    assert q8.device("CPU").kv_bytes == f16.device("CPU").kv_bytes * 34 // 64
    assert q8.llama_kwargs["type_k"] == 8 and q8.llama_kwargs["flash_attn"] is True
    with pytest.raises(UsageError):
        plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M", kv_type="q4_0", flash_attn=False), machine())


def test_does_not_fit_says_why() -> None:
    p = plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M", n_ctx=131072), machine(ram_gib=8))
    assert not p.fits and "RAM" in p.why and "DOES NOT FIT" in p.headline
    forced = plan_model("llama-3.1-70b", PlanOptions(quant="Q4_K_M", n_ctx=4096, n_gpu_layers=81), machine(24))
    assert not forced.fits and "GPU0" in forced.why and forced.n_gpu_layers == 81


def test_kwargs_and_cli_args() -> None:
    p = plan_model("llama-3.1-70b", PlanOptions(quant="Q4_K_M", n_ctx=8192, n_threads=6), machine(24, 24))
    kw = p.llama_kwargs
    for key in ("n_ctx", "n_gpu_layers", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "type_k", "type_v",
                "flash_attn", "use_mmap", "use_mlock", "tensor_split", "main_gpu", "split_mode"):
        assert key in kw
    assert kw["n_ctx"] == 8192 and kw["n_threads"] == 6 and kw["split_mode"] == 1
    cli = p.llama_cli_args
    assert cli[cli.index("-ngl") + 1] == str(p.n_gpu_layers) and cli[cli.index("-c") + 1] == "8192"
    assert "-ts" in cli
    data = json.loads(json.dumps(p.to_json()))
    for key in ("file_bytes", "n_ctx", "n_gpu_layers", "tokens_per_second", "fits", "llama_kwargs", "llama_cli_args"):
        assert key in data
    for d in data["devices"]:
        for key in ("name", "weights_bytes", "kv_bytes", "compute_bytes", "total_bytes", "capacity_bytes"):
            assert key in d
    assert [d["name"] for d in data["devices"]][:3] == ["GPU0", "GPU1", "CPU"]


def test_speed_model_orders_hardware_sensibly() -> None:
    opts = PlanOptions(quant="Q4_K_M", n_ctx=4096)
    cpu = plan_model("llama-3.1-70b", opts, machine())
    one = plan_model("llama-3.1-70b", opts, machine(24))
    two = plan_model("llama-3.1-70b", opts, machine(24, 24))
    assert cpu.tokens_per_second < one.tokens_per_second < two.tokens_per_second
    assert two.prompt_tokens_per_second > cpu.prompt_tokens_per_second
    fast = plan_model("llama-3.1-70b", opts, what_if(machine(), ram_bandwidth=200e9))
    assert fast.tokens_per_second >= cpu.tokens_per_second


def _rates(scale: float, threads: int = 16, overhead: float = 1e-3) -> CpuRates:
    over = Overhead(overhead, 0.0, 0.0)
    types = tuple(TypeRate(t.name, t.one_thread * scale, t.one_thread * scale * threads) for t in TYPICAL_AVX2.types)
    return CpuRates(threads, True, over, over, types)


def test_speed_is_physics_of_bytes_rates_and_overhead() -> None:
    """CPU-only, everything in RAM: per token = max(bytes / RAM bandwidth, weights / measured rates) + overhead."""
    opts = PlanOptions(quant="Q4_K_M", n_ctx=4096, n_threads=16)
    slow = plan_model("llama-3.1-8b", opts, replace(machine(), ram_bandwidth=1e15, cpu_rates=_rates(0.01)))
    fast = plan_model("llama-3.1-8b", opts, replace(machine(), ram_bandwidth=1e15, cpu_rates=_rates(0.02)))
    slow_cpu, fast_cpu = slow.time_per_token["CPU"], fast.time_per_token["CPU"]
    assert fast_cpu == pytest.approx(slow_cpu / 2, rel=1e-6)  # compute bound: twice the rate, half the time
    assert slow.time_per_token["fixed"] == pytest.approx(1e-3)
    assert 1 / slow.tokens_per_second == pytest.approx(sum(slow.time_per_token.values()))
    mem = plan_model("llama-3.1-8b", opts, replace(machine(), ram_bandwidth=5e9, cpu_rates=_rates(1.0)))
    mem2 = plan_model("llama-3.1-8b", opts, replace(machine(), ram_bandwidth=5e9, cpu_rates=_rates(2.0)))
    assert mem.time_per_token["CPU"] == mem2.time_per_token["CPU"]  # memory bound: the rates do not matter
    cpu = mem.device("CPU")
    assert mem.time_per_token["CPU"] >= (cpu.weights_bytes - cpu.repack_bytes) / 5e9 * 0.5


def test_speed_without_measurement_uses_typical_rates() -> None:
    opts = PlanOptions(quant="Q4_K_M", n_ctx=4096, n_threads=16)
    typical = plan_model("llama-3.1-8b", opts, replace(machine(), ram_bandwidth=1e15))
    same = plan_model("llama-3.1-8b", opts, replace(machine(), ram_bandwidth=1e15,
                                                   cpu_rates=replace(TYPICAL_AVX2, measured=True, threads=16)))
    assert typical.tokens_per_second > 0
    assert same.tokens_per_second < typical.tokens_per_second  # measured: no gain past the measured threads


def test_catalog_405b_plans() -> None:
    """Planning a catalog model needs no file (how long it takes: bench/bench_latency.py)."""
    p = plan_model("llama-3.1-405b-instruct", PlanOptions(quant="IQ2_XXS"), machine(24))
    assert p.n_params > 400e9 and 90 * GiB < p.file_bytes < 120 * GiB
    assert p.headline.startswith("Llama 3.1 405B Instruct IQ2_XXS:")


def test_best_quant_recommends() -> None:
    rows, pick = best_quant("llama-3.1-70b", PlanOptions(), machine(24, 24, ram_gib=64))
    names = [r.quant for r in rows]
    assert names[0] == "BF16" and "Q4_K_M" in names and pick in names
    chosen = rows[names.index(pick)].plan
    assert chosen.fits and not chosen.disk_stream_bytes
    klds = [r.kld for r in rows if r.kld is not None]  # least quality lost first (the measured table)
    assert klds == sorted(klds) and len(klds) >= len(rows) - 2


def test_unknown_model_and_options() -> None:
    with pytest.raises(UsageError, match="unknown model"):
        plan_model("llama-9-1t", PlanOptions(quant="Q4_K_M"), machine())
    with pytest.raises(UsageError):
        plan_model("llama-3.1-8b", PlanOptions(quant="Q4_K_M", kv_type="q3"), machine())
    with pytest.raises(UsageError):
        plan_model("llama-3.1-8b", PlanOptions(quant="Q9_Z"), machine())


def test_cli_json_and_table(tmp_path) -> None:
    from corral.app.cli.main import cli

    hwfile = tmp_path / "hw.json"
    hwfile.write_text(json.dumps(machine(24).to_json()))
    r = CliRunner().invoke(cli, ["plan", "llama-3.1-8b", "-q", "Q4_K_M", "--hardware", str(hwfile), "--ctx", "8192",
                                 "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["n_gpu_layers"] == 33 and data["n_ctx"] == 8192 and data["fits"] is True
    r = CliRunner().invoke(cli, ["plan", "llama-3.1-405b", "-q", "IQ2_XXS", "--hardware", str(hwfile),
                                 "--gpu", "rtx4090", "--gpu", "16GiB@500GB/s", "--ram", "128GiB"])
    assert r.exit_code == 0, r.output
    assert "GPU1" in r.output and "tok/s" in r.output and "llama-cli" in r.output
    r = CliRunner().invoke(cli, ["plan", "llama-3.1-8b", "--hardware", str(hwfile), "--best-quant", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["recommended"]
    r = CliRunner().invoke(cli, ["plan", "llama-3.1-8b", "--gpu", "voodoo5"])
    assert r.exit_code == 2 and "unknown GPU" in r.output


def test_memory_constants_follow_llama_cpp() -> None:
    assert memory.pad_ctx(1) == 256 and memory.pad_ctx(8192) == 8192 and memory.pad_ctx(8193) == 8448
    assert memory.batches(300, 2048, 512) == (300, 300)
    assert parse_gpu_spec("rtx4090").memory_bytes == 24 * GiB
