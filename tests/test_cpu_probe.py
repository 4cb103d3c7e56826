"""llama.cpp's CPU extra buffers: the AMX accounting, the crash probe (real and simulated) and its verdict cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from corral.app.cli.main import cli
from corral.convert.llama_family import LlamaHParams
from corral.convert.units import GiB
from corral.offload import cpu_probe, memory
from corral.offload.api import PlanOptions, plan_model, plan_profile
from corral.offload.bandwidth import cache_dir
from corral.offload.catalog import CATALOG, ModelShape
from corral.offload.hardware import Hardware, cpu_info
from corral.offload.profile import TensorInfo, profile_from_shape

T = GGMLQuantizationType
AVX2 = frozenset({"avx2", "fma", "f16c"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AMX = AVX512 | {"avx512_vnni", "amx_int8", "amx_tile", "amx_bf16"}
SEGV_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]


def machine(flags: frozenset[str], **kw: object) -> Hardware:
    return Hardware(ram_total=256 * GiB, ram_available=240 * GiB, cpu_cores=8, cpu_threads=16, cpu_flags=flags,
                    cpu_name="Test Xeon", ram_bandwidth=100e9, bandwidth_measured=True, **kw)  # type: ignore[arg-type]


def t(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> TensorInfo:
    return TensorInfo(name=name, shape=shape, ggml_type=qtype)


# ---------------------------------------------------------------- the AMX buffer, from llama.cpp's rules

def amx_reference(tensor: TensorInfo) -> int | None:
    """What llama.cpp 0.3.36's AMX buffer takes, written out from its sources:
    - amx/amx.cpp extra_buffer_type::supports_op: MUL_MAT weights only (GET_ROWS token_embd never), rows (ne1)
      a multiple of TILE_N*2 = 32, row length (ne0) a multiple of 32 for Q4_0/Q4_1/Q8_0, of QK_K = 256 for
      Q4_K/Q5_K/Q6_K/IQ4_XS, of 16 for F16; no other type;
    - amx/mmq.cpp ggml_backend_amx_get_alloc_size / get_row_size: rows x (blocks x block bytes, + 4 bytes per
      block for Q8_0 (compensation), Q4_K and Q5_K (scales/mins), + 2 per block for IQ4_XS); F16 unchanged;
    - amx/amx.cpp get_alignment: TENSOR_ALIGNMENT = 32 (ggml-impl.h)."""
    k_align = {T.Q4_0: 32, T.Q4_1: 32, T.Q8_0: 32, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256, T.IQ4_XS: 256, T.F16: 16}
    extra = {T.Q8_0: 4, T.Q4_K: 4, T.Q5_K: 4, T.IQ4_XS: 2}
    if tensor.kind not in ("attn", "ffn", "output") or tensor.ggml_type not in k_align:
        return None
    k, n = tensor.shape
    if k % k_align[tensor.ggml_type] or n % 32:
        return None
    if tensor.ggml_type == T.F16:
        size = tensor.nbytes
    else:
        block, type_size = GGML_QUANT_SIZES[tensor.ggml_type]
        size = n * (k // block) * (type_size + extra.get(tensor.ggml_type, 0))
    return -(-size // 32) * 32


def test_amx_sizes_follow_llama_cpp_rules() -> None:
    amx = memory.amx_types(AMX, False)
    # Q4_K 4096 x 4096: 16 blocks of 144 bytes per row, +4 bytes per block
    assert memory.amx_nbytes(t("blk.0.attn_q.weight", (4096, 4096), T.Q4_K), amx) == 4096 * 16 * 148
    assert memory.amx_nbytes(t("blk.0.ffn_down.weight", (14336, 4096), T.Q8_0), amx) == 4096 * 448 * 38
    assert memory.amx_nbytes(t("blk.0.attn_v.weight", (4096, 1024), T.Q6_K), amx) == 1024 * 16 * 210
    assert memory.amx_nbytes(t("blk.0.attn_k.weight", (4096, 1024), T.IQ4_XS), amx) == 1024 * 16 * 138
    assert memory.amx_nbytes(t("blk.0.attn_output.weight", (4096, 4096), T.Q4_0), amx) == 4096 * 128 * 18
    assert memory.amx_nbytes(t("output.weight", (4096, 4096), T.F16), amx) == 4096 * 4096 * 2
    assert memory.amx_nbytes(t("token_embd.weight", (4096, 4096), T.Q4_K), amx) is None  # GET_ROWS
    assert memory.amx_nbytes(t("blk.0.attn_q.weight", (4096, 4096), T.Q2_K), amx) is None
    assert memory.amx_nbytes(t("blk.0.attn_q.weight", (4096, 4096), T.BF16), amx) is None
    assert memory.amx_nbytes(t("blk.0.attn_q.weight", (4096, 40), T.Q4_0), amx) is None  # 40 rows: not 32k
    # no AMX: without amx_int8 + avx512_vnni (amx.cpp is compiled only with both), or with a GPU
    assert memory.amx_types(AMX - {"avx512_vnni"}, False) == frozenset()
    assert memory.amx_types(AMX - {"amx_int8"}, False) == frozenset()
    assert memory.amx_types(AMX, True) == frozenset()


def test_amx_comes_before_repack_and_leaves_the_rest() -> None:
    """ggml-cpu.cpp lists AMX before CPU_REPACK: a Q4_0 matrix both take goes to AMX; one AMX refuses (rows not a
    multiple of 32) falls through to CPU_REPACK; Q2_K (AVX-512 repack, no AMX kernel) goes to CPU_REPACK."""
    amx, repack = memory.amx_types(AMX, False), memory.repack_types(AMX, False)
    assert memory.cpu_buffer_of(t("blk.0.attn_q.weight", (4096, 4096), T.Q4_0), amx, repack)[0] == "AMX"
    assert memory.cpu_buffer_of(t("blk.0.attn_q.weight", (4096, 40), T.Q4_0), amx, repack)[0] == "CPU_REPACK"
    assert memory.cpu_buffer_of(t("blk.0.attn_q.weight", (4096, 4096), T.Q2_K), amx, repack)[0] == "CPU_REPACK"
    assert memory.cpu_buffer_of(t("blk.0.attn_q.weight", (4096, 4096), T.BF16), amx, repack)[0] == "CPU_Mapped"


@pytest.mark.parametrize("name,quant", [("llama-3.1-8b", "Q4_K_M"), ("llama-3.1-8b", "IQ4_XS"),
                                        ("llama-3.1-70b", "Q8_0"), ("llama-3.2-1b", "Q4_K_M")])
def test_plan_counts_the_amx_buffer_as_resident(name: str, quant: str) -> None:
    shape = CATALOG[name] if name in CATALOG else ModelShape(name, LlamaHParams(2048, 16, 32, 8, 8192, tie_embeddings=True))
    profile = profile_from_shape(shape, quant)
    want_amx = sum(amx_reference(x) or 0 for x in profile.tensors)
    if profile.tie_embeddings:  # llama.cpp loads token_embd again as the output (a MUL_MAT weight)
        want_amx += amx_reference(memory.tied_output(next(x for x in profile.tensors if x.kind == "embd"))) or 0
    assert want_amx > 0
    plan = plan_profile(profile, PlanOptions(n_ctx=4096), machine(AMX))
    cpu = plan.device("CPU")
    assert cpu is not None and cpu.amx_bytes == want_amx
    mapped = [x for x in profile.tensors if amx_reference(x) is None and not memory.is_repacked(
        x, memory.repack_types(AMX, False))]
    assert cpu.weights_bytes == sum(x.nbytes for x in mapped) + cpu.amx_bytes + cpu.repack_bytes
    assert plan.use_extra_bufts
    avx2 = plan_profile(profile, PlanOptions(n_ctx=4096), machine(AVX2)).device("CPU")
    assert avx2 is not None and avx2.amx_bytes == 0


def test_broken_buffer_turns_extra_buffers_off_with_one_warning() -> None:
    profile = profile_from_shape(CATALOG["llama-3.1-8b"], "Q4_K_M")
    plan = plan_profile(profile, PlanOptions(n_ctx=4096), machine(AMX, broken_cpu_buffers=frozenset({"AMX"})))
    cpu = plan.device("CPU")
    assert cpu is not None and cpu.amx_bytes == 0 and cpu.repack_bytes == 0
    assert not plan.use_extra_bufts and "--no-repack" in plan.llama_cli_args
    assert len([w for w in plan.warnings if "AMX" in w]) == 1
    # a broken buffer this plan would not use changes nothing
    ok = plan_profile(profile_from_shape(CATALOG["llama-3.1-8b"], "BF16"), PlanOptions(n_ctx=4096),
                      machine(AMX, broken_cpu_buffers=frozenset({"AMX"})))
    assert ok.use_extra_bufts and not [w for w in ok.warnings if "AMX" in w]


# ---------------------------------------------------------------- the probe, simulated

def test_segfaulting_probe_is_broken_cached_and_planned_around(tmp_path: Path) -> None:
    hw = machine(AMX)
    profile = profile_from_shape(CATALOG["llama-3.1-8b"], "Q4_K_M")
    assert cpu_probe.needed_buffers(hw, profile) == {"AMX"}  # every Q4_K/Q6_K matrix fits AMX's tiles
    checked = cpu_probe.check_extra_buffers(hw, profile, cache=tmp_path, command=SEGV_CHILD)
    assert checked.broken_cpu_buffers == {"AMX"}
    key = cpu_probe.probe_key(hw.cpu_name, hw.cpu_flags)
    cached = cpu_probe.cached_verdicts(key, cache=tmp_path)
    v = cached["AMX"]
    assert v.status == "broken" and v.signal == "SIGSEGV" and v.returncode == -11 and "SIGSEGV" in v.detail
    on_disk = json.loads((tmp_path / cpu_probe.PROBE_CACHE_FILE).read_text())
    assert on_disk[key]["AMX"]["signal"] == "SIGSEGV"
    # the cache answers next time: a child that would succeed is never run
    again = cpu_probe.check_extra_buffers(hw, profile, cache=tmp_path, command=[sys.executable, "-c", "1/0"])
    assert again.broken_cpu_buffers == {"AMX"}
    plan = plan_profile(profile, PlanOptions(n_ctx=4096), checked)
    assert not plan.use_extra_bufts and plan.device("CPU").amx_bytes == 0  # type: ignore[union-attr]
    assert sum("crashed a test run" in w for w in plan.warnings) == 1
    # another llama.cpp build is another key: probed afresh
    assert cpu_probe.probe_key(hw.cpu_name, hw.cpu_flags, "0.3.37") != key


def test_probe_outcomes(tmp_path: Path) -> None:
    def run(code: str, timeout: float = 30) -> cpu_probe.Verdict:
        return cpu_probe.run_probe("AMX", AMX, command=[sys.executable, "-c", code], timeout=timeout)

    hang = run("import time; time.sleep(30)", timeout=1)
    assert hang.status == "broken" and "timed out" in hang.detail
    abort = run("import os; os.abort()")
    assert abort.status == "broken" and abort.signal == "SIGABRT"
    failed = run("raise SystemExit('no llama_cpp here')")
    assert failed.status == "error" and not failed.broken and failed.returncode == 1
    report = 'import sys, json; sys.stderr.write("load_tensors: {0} model buffer size = 2.50 MiB\\n"); ' \
             'print(json.dumps({{"finite": {1}, "tokens": 12, "system_info": "AMX_INT8 = 1"}}))'
    works = run(report.format("AMX", True))
    assert works.status == "works" and works.buffers == {"AMX": int(2.5 * 1024**2)} and works.system_info
    assert run(report.format("AMX", False)).status == "broken"  # non-finite logits
    assert run(report.format("CPU_Mapped", True)).status == "unused"  # llama.cpp kept it out of AMX


def test_amx_missing_from_the_build_falls_back_to_repack(tmp_path: Path) -> None:
    """An AMX CPU whose llama.cpp has no AMX buffer (a generic build, or tile data refused by the kernel): the
    probe sees no AMX buffer in llama.cpp's log, so the plan puts those weights where llama.cpp does (the
    repack buffer, probed in turn) instead of counting an AMX buffer that never appears."""
    child = ('import sys, json; sys.stderr.write("load_tensors: CPU_REPACK model buffer size = 1.00 MiB\\n"); '
             'print(json.dumps({"finite": True, "tokens": 12, "system_info": "AVX512 = 1"}))')
    hw = cpu_probe.check_extra_buffers(machine(AMX), profile_from_shape(CATALOG["llama-3.1-8b"], "Q4_K_M"),
                                       cache=tmp_path, command=[sys.executable, "-c", child])
    assert hw.absent_cpu_buffers == {"AMX"} and not hw.broken_cpu_buffers
    verdicts = cpu_probe.cached_verdicts(cpu_probe.probe_key(hw.cpu_name, hw.cpu_flags), cache=tmp_path)
    assert {b: v.status for b, v in verdicts.items()} == {"AMX": "unused", "CPU_REPACK": "works"}
    plan = plan_profile(profile_from_shape(CATALOG["llama-3.1-8b"], "Q4_K_M"), PlanOptions(n_ctx=4096), hw)
    cpu = plan.device("CPU")
    assert cpu is not None and cpu.amx_bytes == 0 and cpu.repack_bytes > 3 * GiB and plan.use_extra_bufts


def test_a_plan_for_other_hardware_is_checked_on_this_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan made for another machine (a file, a what-if, a test's made-up one) never asked this CPU's probe:
    the engine's load asks it, and turns extra buffers off when one this model would use is broken here."""
    from dataclasses import replace

    from corral.app.runtime.setup import checked_on_this_cpu
    from corral.convert.gguf_file import read_gguf
    from corral.convert.quantize import quantize_gguf
    from tests.helpers.engine import cpu_plan, write_tiny_gguf

    f32 = write_tiny_gguf(tmp_path / "tiny.gguf")
    q8 = tmp_path / "tiny-q8_0.gguf"
    quantize_gguf(f32, q8, ftype="Q8_0", threads=1)
    monkeypatch.setattr(cpu_probe, "cpu_info", lambda: (AMX, "an AMX CPU whose tiles crash"))
    monkeypatch.setattr(cpu_probe, "probe_command", lambda *_: SEGV_CHILD)
    plan = cpu_plan()
    assert plan.hardware_source != "detected" and plan.load.use_extra_bufts
    settings, note = checked_on_this_cpu(plan, plan.load, read_gguf(q8), q8)
    assert not settings.use_extra_bufts and note is not None and "AMX" in note
    here = replace(plan, hardware_source="detected")  # planned on this machine: checked by the planner already
    assert checked_on_this_cpu(here, plan.load, read_gguf(q8), q8) == (plan.load, None)
    monkeypatch.setattr(cpu_probe, "cpu_info", lambda: (frozenset(), "a CPU with no extra buffer"))
    assert checked_on_this_cpu(plan, plan.load, read_gguf(q8), q8) == (plan.load, None)


def test_probe_switch_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cpu_probe.ENV_SWITCH, "off")
    hw = machine(AMX)
    profile = profile_from_shape(CATALOG["llama-3.1-8b"], "Q4_K_M")
    assert cpu_probe.check_extra_buffers(hw, profile, cache=tmp_path, command=SEGV_CHILD) is hw
    assert not (tmp_path / cpu_probe.PROBE_CACHE_FILE).exists()


# ---------------------------------------------------------------- the probe, for real on this machine

def _llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def test_real_probe_on_this_cpu(tmp_path: Path) -> None:
    flags, name = cpu_info()
    buffers = cpu_probe.buffers_for_cpu(flags)
    if not _llama_cpp() or not buffers:
        pytest.skip(f"needs llama-cpp-python and a CPU with an extra buffer: {name} has "
                    f"avx2={'avx2' in flags}, amx_int8={'amx_int8' in flags}, avx512_vnni={'avx512_vnni' in flags}")
    hw = Hardware(cpu_flags=flags, cpu_name=name)
    verdicts = {v.buffer: v for v in cpu_probe.machine_verdicts(hw, cache=tmp_path)}
    assert set(verdicts) == set(buffers)
    for v in verdicts.values():
        assert v.status in ("works", "broken", "unused"), v
        assert v.returncode is not None
        assert v.system_info or v.signal, v  # a child that died of a signal printed nothing
    if "CPU_REPACK" in verdicts and "AMX" not in buffers:
        v = verdicts["CPU_REPACK"]
        assert v.status == "works", v  # AVX2/AVX-512 without AMX: the repack kernels run
        assert v.buffers.get("CPU_REPACK", 0) > 0


def test_plan_model_probes_once_and_caches(mini_q4km_small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags, name = cpu_info()
    if not _llama_cpp() or not memory.repack_types(flags, False) and not memory.has_amx(flags):
        pytest.skip(f"needs llama-cpp-python and an AVX2 or AMX CPU ({name})")
    calls: list[str] = []
    real = cpu_probe.run_probe

    def counted(buffer: str, *a: object, **kw: object) -> cpu_probe.Verdict:
        calls.append(buffer)
        return real(buffer, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_probe, "run_probe", counted)
    (cache_dir() / cpu_probe.PROBE_CACHE_FILE).unlink(missing_ok=True)  # the session's verdicts (conftest)
    hw = Hardware(ram_total=64 * GiB, ram_available=60 * GiB, cpu_flags=flags, cpu_name=name)
    first = plan_model(mini_q4km_small, PlanOptions(n_ctx=512), hw)
    second = plan_model(mini_q4km_small, PlanOptions(n_ctx=512), hw)
    assert calls and len(calls) == len(set(calls))  # each buffer probed once, then cached
    assert first.use_extra_bufts == second.use_extra_bufts


@pytest.fixture(scope="module")
def mini_q4km_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe's own tiny model with Q4_K/Q6_K matrices: a Q4_K_M-like file without a tokenizer."""
    if not _llama_cpp():
        pytest.skip("needs llama-cpp-python")
    return cpu_probe.probe_model(tmp_path_factory.mktemp("probe") / "m.gguf", [T.Q4_K, T.Q6_K])


def test_info_hardware_json_shows_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    flags, name = cpu_info()
    result = CliRunner().invoke(cli, ["info", "--hardware", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["hardware"]["cpu_name"] == name
    assert set(data["cpu_buffers"]) == set(cpu_probe.buffers_for_cpu(flags))
    for entry in data["cpu_buffers"].values():
        assert entry["verdict"]["status"] in ("works", "broken", "unused", "error")
    human = CliRunner().invoke(cli, ["info", "--hardware"])
    assert human.exit_code == 0 and "AMX buffer" in human.stdout and "CPU_REPACK buffer" in human.stdout
