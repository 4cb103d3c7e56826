"""RPC workers planned as devices: endpoints, placement over workers + local devices, the network's cost per
token, the refusal when a worker cannot take its share, and plan rows (fake workers: the planner never probes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from corral.convert.errors import InvalidFile, UsageError
from corral.convert.units import GiB
from corral.offload import memory
from corral.offload.api import PlanOptions, plan_model
from corral.offload.hardware import GPU, Hardware, hardware_from_json
from corral.offload.rpc import (
    RpcDevice,
    RpcLink,
    RpcWorker,
    check_unique,
    parse_endpoint,
    with_memory_bandwidth,
    workers_from_json,
)

N_EMBD_405B, N_VOCAB = 16384, 128256


def worker(host: str, gib: float, *, n: int, latency: float = 3e-4, bandwidth: float = 1.17e9,
           free_gib: float | None = None, mem_bw: float | None = None) -> RpcWorker:
    """A worker exposing one device: a CPU (free == total, as ggml's CPU device reports) unless `free_gib`."""
    ep = f"{host}:50052"
    total = int(gib * GiB)
    free = total if free_gib is None else int(free_gib * GiB)
    return RpcWorker(ep, (RpcDevice(ep, 0, f"RPC{n}", ep, free, total, mem_bw),), RpcLink(ep, latency, bandwidth))


def machine(ram_gib: float = 64, workers: tuple[RpcWorker, ...] = (), gpus: tuple[GPU, ...] = ()) -> Hardware:
    return Hardware(gpus=gpus, ram_total=int(ram_gib * GiB), ram_available=int(ram_gib * GiB * 0.9), cpu_cores=16,
                    cpu_threads=32, cpu_name="test CPU", ram_bandwidth=60e9, disk_bandwidth=3e9,
                    bandwidth_measured=True, source="test", rpc_workers=workers)


THREE_MACHINES = machine(64, (worker("10.0.0.2", 64, n=0), worker("10.0.0.3", 64, n=1)))
Q2K_8K = PlanOptions(quant="Q2_K", n_ctx=8192)


@pytest.mark.parametrize("text, want", [
    ("10.0.0.2:50052", "10.0.0.2:50052"),
    ("  Worker-1.LAN:50052 ", "worker-1.lan:50052"),
    ("[::1]:50052", "[::1]:50052"),
    ("[0:0:0:0:0:0:0:1]:1", "[::1]:1"),
])
def test_endpoints_are_normalised(text: str, want: str) -> None:
    assert parse_endpoint(text) == want


@pytest.mark.parametrize("text, message", [
    ("10.0.0.2", "is not HOST:PORT"),
    (":50052", "is not HOST:PORT"),
    ("host:0", "the port must be a number from 1 to 65535"),
    ("host:65536", "the port must be a number from 1 to 65535"),
    ("host:http", "the port must be a number"),
    ("::1:50052", "write an IPv6 host in brackets"),
    ("[nothost]:5", "is not an IPv6 address"),
    ("bad host:5", "is not a host name or address"),
    ("a..b:5", "is not a host name or address"),
])
def test_bad_endpoints_are_one_line_usage_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_endpoint(text)
    assert "\n" not in str(info.value)


def test_the_same_worker_twice_is_refused() -> None:
    assert check_unique(["A:1", "b:2"]) == ("a:1", "b:2")
    with pytest.raises(UsageError, match="given twice"):
        check_unique(["a:1", " A:1"])


def test_405b_q2_k_on_three_machines() -> None:
    """Llama 3.1 405B Q2_K (~139 GiB) on three 64 GiB machines: the workers take what they can hold, in --rpc
    order, this machine's RAM the first layers; nothing streams from disk."""
    p = plan_model("llama-3.1-405b", Q2K_8K, THREE_MACHINES)
    rpc0, rpc1, cpu = p.device("RPC0"), p.device("RPC1"), p.device("CPU")
    assert rpc0 is not None and rpc1 is not None and cpu is not None
    assert [d.name for d in p.devices] == ["RPC0", "RPC1", "CPU"]
    assert p.fits and not p.disk_stream_bytes and p.time_per_token.get("disk", 0.0) == 0.0
    assert rpc0.endpoint == "10.0.0.2:50052" and rpc1.endpoint == "10.0.0.3:50052" and rpc0.kind == "rpc"
    assert rpc0.layers + rpc1.layers + cpu.layers == 126 and min(rpc0.layers, rpc1.layers, cpu.layers) >= 15
    for d in (rpc0, rpc1):  # each worker filled close to what it has, never beyond
        assert d.fits and d.capacity_bytes == 64 * GiB and d.total_bytes > 0.9 * d.capacity_bytes
        assert d.compute_bytes > 0 and d.kv_bytes == memory.kv_bytes_per_layer(p_profile(), 8192) * d.layers
    load = p.load
    assert load.rpc_servers == ("10.0.0.2:50052", "10.0.0.3:50052") and load.devices == ("RPC0", "RPC1")
    assert load.tensor_split == (float(rpc0.layers), float(rpc1.layers + 1))  # the output layer: the last device
    assert load.n_gpu_layers == rpc0.layers + rpc1.layers + 1
    cli = load.cli_args()
    assert cli[cli.index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"
    assert cli[cli.index("-dev") + 1] == "RPC0,RPC1"
    assert "RPC0 (10.0.0.2:50052)" in p.headline and "RPC1 (10.0.0.3:50052)" in p.headline
    # a worker's CPU reads like this machine's RAM: its memory time is its bytes at 60 GB/s
    assert p.time_per_token["RPC0"] >= rpc0.weights_bytes / 60e9
    assert any("memory bandwidth of worker 10.0.0.2:50052, 10.0.0.3:50052 unknown" in w for w in p.warnings)


def p_profile():  # the 405B Q2_K profile the plans above use
    from corral.offload.profile import load_profile

    return load_profile("llama-3.1-405b", "Q2_K")[0]


def _network(stretches: list[tuple[float, float, bool]], fill: int = 4096) -> float:
    """The cost the module docstring of offload.rpc states, by hand: per stretch a round trip plus the
    activations and the f16 mask in, and the activations (or the logits) out."""
    mask = fill * 2
    return sum(lat + (N_EMBD_405B * 4 + mask + (N_VOCAB if out else N_EMBD_405B) * 4) / bw
               for lat, bw, out in stretches)


@pytest.mark.parametrize("latency, bandwidth", [(3e-4, 1.17e9), (2e-3, 117e6), (5e-5, 12e9)])
def test_link_cost_is_its_own_tier_of_the_prediction(latency: float, bandwidth: float) -> None:
    hw = machine(64, (worker("10.0.0.2", 64, n=0, latency=latency, bandwidth=bandwidth),
                      worker("10.0.0.3", 64, n=1, latency=latency, bandwidth=bandwidth)))
    p = plan_model("llama-3.1-405b", Q2K_8K, hw)
    want = _network([(latency, bandwidth, False), (latency, bandwidth, True)])
    assert p.time_per_token["network"] == pytest.approx(want, rel=1e-9)
    assert 1.0 / p.tokens_per_second == pytest.approx(sum(p.time_per_token.values()), rel=1e-9)
    # the same placement over a perfect link: the difference is exactly the network's time
    free = plan_model("llama-3.1-405b", Q2K_8K, machine(64, (worker("10.0.0.2", 64, n=0, latency=1e-12,
                                                                    bandwidth=1e30),
                                                             worker("10.0.0.3", 64, n=1, latency=1e-12,
                                                                    bandwidth=1e30))))
    assert free.devices == p.devices
    assert 1 / p.tokens_per_second - 1 / free.tokens_per_second == pytest.approx(want, rel=1e-6)
    assert p.prompt_tokens_per_second < free.prompt_tokens_per_second


def test_a_local_gpu_keeps_the_output_and_the_logits_off_the_network() -> None:
    """llama.cpp's order: workers' devices first, the local GPUs last (they get the output layer); the devices
    are then left to llama.cpp's default list, which is the same order."""
    gpu = GPU(0, "sim 24GiB", 24 * GiB, 24 * GiB, 1000e9, True)
    p = plan_model("llama-3.1-405b", Q2K_8K, machine(64, (worker("10.0.0.2", 64, n=0),), gpus=(gpu,)))
    assert [d.name for d in p.devices][:2] == ["RPC0", "GPU0"]
    rpc0, gpu0 = p.device("RPC0"), p.device("GPU0")
    assert rpc0 is not None and gpu0 is not None and rpc0.layers > 0 and gpu0.layers > 0
    assert p.load.devices == () and p.load.rpc_servers == ("10.0.0.2:50052",)
    assert p.load.tensor_split == (float(rpc0.layers), float(gpu0.layers + 1))
    assert p.time_per_token["network"] == pytest.approx(_network([(3e-4, 1.17e9, False)]), rel=1e-9)
    assert gpu0.compute_bytes > rpc0.compute_bytes  # op offload copies and the output's buffer: the local GPU


def test_a_worker_too_small_for_its_share_is_refused_before_loading() -> None:
    """Forced onto the workers (-ngl), 405B Q2_K overflows both: the plan does not fit and says, per worker,
    what it has and what its share needs (ask and chat refuse such a plan before loading)."""
    small = machine(64, (worker("10.0.0.2", 64, n=0), worker("10.0.0.3", 16, n=1)))
    forced = plan_model("llama-3.1-405b", replace(Q2K_8K, n_gpu_layers=127), small)
    big, little = forced.device("RPC0"), forced.device("RPC1")
    assert not forced.fits and big is not None and little is not None and not big.fits and not little.fits
    assert forced.why == (f"worker 10.0.0.2:50052 (RPC0) has 64.0 GiB free, its share needs "
                          f"{big.total_bytes / GiB:.1f} GiB")
    assert (f"worker 10.0.0.3:50052 (RPC1) has 16.0 GiB free, its share needs {little.total_bytes / GiB:.1f} GiB"
            in forced.warnings)
    from corral.app.runtime.setup import does_not_fit_message

    assert does_not_fit_message(forced).startswith(f"the model will not fit: {forced.why}.")
    # left to the planner, the small worker takes what it can hold and the rest goes elsewhere
    auto = plan_model("llama-3.1-405b", Q2K_8K, small)
    big, little = auto.device("RPC0"), auto.device("RPC1")
    assert auto.fits and big is not None and little is not None and 0 < little.layers < big.layers // 2
    assert little.total_bytes <= little.capacity_bytes and big.total_bytes <= big.capacity_bytes


def test_a_worker_with_no_room_for_a_layer_is_named() -> None:
    hw = machine(64, (worker("10.0.0.2", 64, n=0), worker("10.0.0.3", 64, n=1, free_gib=0.5)))
    p = plan_model("llama-3.1-405b", Q2K_8K, hw)
    assert p.device("RPC1") is not None and p.device("RPC1").layers == 0  # type: ignore[union-attr]
    assert any("worker 10.0.0.3:50052 (RPC1) gets no layers" in w for w in p.warnings)


def test_worker_gpus_keep_a_vram_margin_and_a_given_bandwidth() -> None:
    gpu_worker = worker("10.0.0.2", 24, n=0, free_gib=23, mem_bw=1000e9)  # free < total: a GPU
    p = plan_model("llama-3.1-70b", PlanOptions(quant="Q4_K_M", n_ctx=4096), machine(64, (gpu_worker,)))
    d = p.device("RPC0")
    assert d is not None and d.capacity_bytes == 23 * GiB and d.overhead_bytes == memory.gpu_margin(24 * GiB)
    assert d.bandwidth == 1000e9 and "GPU device 0 of worker 10.0.0.2:50052" == d.label
    assert not any("unknown" in w for w in p.warnings)
    # a worker's CPU told to read at 20 GB/s: memory bound at that speed (at 60 GB/s its dot products bound it)
    told = with_memory_bandwidth(THREE_MACHINES.rpc_workers, 20e9)
    slow = plan_model("llama-3.1-405b", Q2K_8K, replace(THREE_MACHINES, rpc_workers=told))
    rpc0 = slow.device("RPC0")
    assert rpc0 is not None and rpc0.bandwidth == 20e9
    assert slow.time_per_token["RPC0"] > (rpc0.weights_bytes + rpc0.kv_bytes / 2) / 20e9
    assert slow.time_per_token["RPC0"] > 2 * plan_model("llama-3.1-405b", Q2K_8K,
                                                        THREE_MACHINES).time_per_token["RPC0"]


def test_draft_models_stay_on_this_machine(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.helpers.engine import shared_tiny_gguf

    draft = shared_tiny_gguf(tmp_path_factory)
    p = plan_model("llama-3.1-405b", replace(Q2K_8K, draft=str(draft)), THREE_MACHINES)
    assert p.draft is not None and not any(d.kind == "rpc" for d in p.draft.devices)
    assert p.draft.load.rpc_servers == () and p.load.rpc_servers == ("10.0.0.2:50052", "10.0.0.3:50052")


def test_json_rows_name_the_worker_device_layers_bytes_and_free_memory() -> None:
    p = plan_model("llama-3.1-405b", Q2K_8K, THREE_MACHINES)
    data = json.loads(json.dumps(p.to_json()))
    rows = {row["name"]: row for row in data["devices"]}
    for name, endpoint in (("RPC0", "10.0.0.2:50052"), ("RPC1", "10.0.0.3:50052")):
        row = rows[name]
        d = p.device(name)
        assert d is not None
        assert row["kind"] == "rpc" and row["endpoint"] == endpoint and row["layers"] == d.layers > 0
        assert row["weights_bytes"] == d.weights_bytes and row["total_bytes"] == d.total_bytes
        assert row["capacity_bytes"] == 64 * GiB and row["fits"] is True
    assert rows["CPU"]["endpoint"] == "" and data["time_per_token"]["network"] > 0
    assert data["llama_cli_args"][data["llama_cli_args"].index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"


CLUSTER = {
    "ram_total": "64GiB", "ram_available": "58GiB", "cpu_cores": 16, "cpu_threads": 32, "ram_bandwidth": 60e9,
    "disk_bandwidth": 3e9, "bandwidth_measured": True,
    "rpc_workers": [
        {"endpoint": "10.0.0.2:50052", "devices": [{"total": "64GiB"}],
         "link": {"latency_s": 0.0003, "bandwidth": "1.17GB/s"}},
        {"endpoint": "10.0.0.3:50052", "devices": [{"total": 68719476736}]},
    ],
}


def test_hardware_files_describe_workers_and_round_trip() -> None:
    data = {**CLUSTER, "ram_total": 64 * GiB, "ram_available": 58 * GiB}
    hw = hardware_from_json(data)
    a, b = hw.rpc_workers
    assert a.devices[0] == RpcDevice("10.0.0.2:50052", 0, "RPC0", "10.0.0.2:50052", 64 * GiB, 64 * GiB)
    assert b.devices[0].name == "RPC1" and a.link.measured and not b.link.measured
    assert hardware_from_json(json.loads(json.dumps(hw.to_json()))) == hw
    with pytest.raises(InvalidFile, match="needs an endpoint and devices"):
        workers_from_json([{"endpoint": "a:1"}])
    with pytest.raises(InvalidFile, match="is not HOST:PORT"):
        workers_from_json([{"endpoint": "a", "devices": [{"total": 1}]}])
    with pytest.raises(InvalidFile, match="needs at least total"):
        workers_from_json([{"endpoint": "a:1", "devices": [{"free": 1}]}])


def test_plan_cli_shows_worker_rows_the_network_and_an_unmeasured_link(tmp_path: Path) -> None:
    from corral.app.cli.main import cli

    data = {**CLUSTER, "ram_total": 64 * GiB, "ram_available": 58 * GiB}
    hwfile = tmp_path / "cluster.json"
    hwfile.write_text(json.dumps(data))
    r = CliRunner().invoke(cli, ["plan", "llama-3.1-405b", "-q", "Q2_K", "--ctx", "8192", "--hardware", str(hwfile)],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "RPC0 10.0.0.2:50052" in r.output and "RPC1 10.0.0.3:50052" in r.output
    assert "network: " in r.output and "ms per token" in r.output and "(assumed)" in r.output
    assert "layers on workers" in r.output and "2 RPC workers" in r.output
    assert "the link to worker 10.0.0.3:50052 was not measured" in r.output
    assert "--rpc 10.0.0.2:50052,10.0.0.3:50052 -dev RPC0,RPC1" in r.output
    r = CliRunner().invoke(cli, ["plan", "llama-3.1-405b", "-q", "Q2_K", "--hardware", str(hwfile), "--json",
                                 "--rpc-memory-bandwidth", "90GB/s"])
    assert r.exit_code != 0 and "--rpc-memory-bandwidth needs --rpc" in r.output


@pytest.mark.parametrize("args, message", [
    (["--rpc", "nohost"], "is not HOST:PORT"),
    (["--rpc", "a:1", "--rpc", "A:1"], "given twice"),
])
def test_bad_rpc_flags_fail_before_any_probe(args: list[str], message: str) -> None:
    from corral.app.cli.main import cli

    r = CliRunner().invoke(cli, ["plan", "llama-3.1-8b", *args])
    assert r.exit_code != 0 and message in r.output


def test_ask_and_chat_plan_with_the_probed_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--rpc is a shared model flag: the engine's plan probes the workers (here a fake probe) and its load
    settings carry the servers, devices and split that build_params applies."""
    from corral.app.cli.model_options import pop_model_args
    from corral.app.runtime import rpc as runtime_rpc
    from corral.app.runtime.setup import make_plan
    from corral.offload import hardware
    from tests.helpers.engine import write_tiny_gguf

    probed: list[str] = []

    def fake_probe(endpoint: str, *, measure_link: bool = True) -> RpcWorker:
        probed.append(endpoint)
        return worker(endpoint.rsplit(":", 1)[0], 8, n=len(probed) - 1)

    monkeypatch.setattr(runtime_rpc, "probe", fake_probe)
    monkeypatch.setattr(hardware, "detect_hardware", lambda *a, **k: machine(16))
    args = pop_model_args({"model": "m.gguf", "rpc": ("Host-A:50052", "host-b:50052"),
                           "rpc_memory_bandwidth": "40GB/s", "max_tokens": 8, "draft_max": 8})
    assert args.engine.rpc == ("host-a:50052", "host-b:50052") and args.engine.rpc_memory_bandwidth == 40e9
    model = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=4)
    p = make_plan(model, args.engine)
    assert probed == ["host-a:50052", "host-b:50052"]
    assert p.load.rpc_servers == ("host-a:50052", "host-b:50052") and p.load.devices == ("RPC0", "RPC1")
    assert p.device("RPC0").bandwidth == 40e9  # type: ignore[union-attr]
    assert sum(p.load.tensor_split) == p.load.n_gpu_layers == 5
    with pytest.raises(UsageError, match="needs --rpc"):
        pop_model_args({"model": "m.gguf", "rpc": (), "rpc_memory_bandwidth": "40GB/s", "draft_max": 8})


# ---------------------------------------------------------------- end to end, over loopback workers

BUFFER = re.compile(r"RPC(\d+)\[([^\]]+)\] (model|KV) buffer size\s*=\s*([\d.]+) MiB")


@pytest.fixture(scope="module")
def rpc_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose layers are large enough (MiB) for buffer sizes printed to 0.01 MiB to compare at 5%."""
    from corral.app.runtime import rpc as runtime_rpc
    from tests.helpers.engine import write_tiny_gguf

    if not runtime_rpc.available():
        pytest.skip("this llama-cpp-python was built without RPC (GGML_RPC=on): no workers to plan for")
    return write_tiny_gguf(tmp_path_factory.mktemp("rpc-model") / "mid.gguf", hidden=256, n_layers=6, n_heads=4,
                           n_kv_heads=2, ffn=768)


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    from tests.helpers.rpc import REPO, corral_command

    return subprocess.run(corral_command(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "COLUMNS": "200"})


def test_plan_bytes_per_worker_match_what_the_workers_allocate(rpc_model: Path, tmp_path: Path) -> None:
    """`corral plan --rpc` probes two loopback workers and places layers on them; `corral ask --rpc` loads with
    that plan, and the client's load log says what each worker allocated: weights and KV within 5%."""
    from tests.helpers.rpc import rpc_workers

    with rpc_workers(2, tmp_path) as workers:
        flags = [arg for w in workers for arg in ("--rpc", w.endpoint)]
        planned = _run(["plan", str(rpc_model), "--ctx", "1024", *flags, "--json"])
        assert planned.returncode == 0, planned.stderr
        data = json.loads(planned.stdout)
        table = _run(["plan", str(rpc_model), "--ctx", "1024", *flags])
        assert table.returncode == 0, table.stderr
        asked = _run(["ask", "-m", str(rpc_model), "--ctx", "1024", *flags, "--verbose", "--max-tokens", "4",
                      "--temperature", "0", "Say hi."])
        assert asked.returncode == 0, asked.stderr[-3000:]
    rows = [row for row in data["devices"] if row["kind"] == "rpc"]
    assert [row["endpoint"] for row in rows] == [w.endpoint for w in workers]
    assert data["llama_cli_args"].count("--rpc") == 1 and data["n_gpu_layers"] == 7
    # the split balances bytes: the big output layer (the last device's) weighs as much as all six layers
    assert sum(row["layers"] for row in rows) == 6 and all(row["weights_bytes"] > 2**20 for row in rows)
    allocated: dict[tuple[str, str], float] = {}
    for index, endpoint, kind, mib in BUFFER.findall(asked.stderr):
        assert index == "0"  # one device per worker
        allocated[(endpoint, kind)] = float(mib) * 2**20
    for row in rows:
        model, kv = allocated[(row["endpoint"], "model")], allocated.get((row["endpoint"], "KV"), 0.0)
        assert abs(model - row["weights_bytes"]) <= 0.05 * model, (row, model)
        assert abs(kv - row["kv_bytes"]) <= 0.05 * kv, (row, kv)  # none on a device without layers
    assert sum(kv for (_, kind), kv in allocated.items() if kind == "KV") > 0
    for row in rows:
        assert f"{row['name']} {row['endpoint']}" in table.stdout
    assert "network: " in table.stdout and "ms per token" in table.stdout


def test_the_memory_view_shows_worker_rows_as_remote() -> None:
    from io import StringIO

    from rich.console import Console

    from corral.tui.memory_view import LiveUsage, device_kind, render_memory

    p = plan_model("llama-3.1-405b", Q2K_8K, THREE_MACHINES)
    assert device_kind(p.devices[0]) == ("rpc", 0) and device_kind(p.devices[2]) == ("ram", None)
    out = StringIO()
    Console(file=out, width=200).print(render_memory(p, LiveUsage(5 * GiB)))
    text = out.getvalue()
    assert "on worker 10.0.0.2:50052" in text and "on worker 10.0.0.3:50052" in text and "5.0 GiB RSS" in text


def test_best_quant_rows_count_the_workers_bytes() -> None:
    from corral.offload.api import best_quant

    rows, pick = best_quant("llama-3.1-70b", PlanOptions(n_ctx=4096), machine(16, (worker("10.0.0.2", 64, n=0),)))
    by = {r.quant: r.to_json() for r in rows}
    assert pick is not None and by["Q4_K_M"]["worker_bytes"] > 35 * GiB and by["Q4_K_M"]["disk_bytes"] == 0
    assert by["BF16"]["worker_bytes"] > 55 * GiB and by["BF16"]["disk_bytes"] > 0
