"""Native crashes never take corral down: a child killed by a signal becomes one error line (exit 1), a CPU
buffer that crashes a probe is planned around, and files that make llama.cpp abort() are refused first."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType

import corral.convert.quantize_child as quantize_child
from corral.offload import cpu_probe, hardware

from .conftest import assert_clean_failure, invoke, temp_leftovers

T = GGMLQuantizationType
AMX_FLAGS = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile"})
_TENSOR_LINE = ("[   1/   5]            blk.0.attn_q.weight - [   64,    64,     1,     1], type =    f32, "
                "converting to q8_0 .. size =     0.02 MiB ->     0.00 MiB")


def _dying_child(monkeypatch: pytest.MonkeyPatch, signal_name: str) -> None:
    """The quantizer child logs one tensor line, then dies of `signal_name` (as a native crash would)."""
    real = subprocess.Popen
    code = (f"import os, signal, sys; sys.stderr.write({_TENSOR_LINE!r} + '\\n'); sys.stderr.flush(); "
            f"os.kill(os.getpid(), signal.{signal_name})")

    def popen(cmd: list[str], *args: object, **kwargs: object) -> subprocess.Popen:
        assert cmd[1:3] == ["-m", "corral.convert.quantize_child"]
        return real([sys.executable, "-c", code], *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(quantize_child.subprocess, "Popen", popen)


@pytest.mark.parametrize("sig,hint", [("SIGSEGV", r"--threads 1"), ("SIGKILL", r"out of memory")])
def test_quantizer_crash_is_one_line(sig: str, hint: str, corpus_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _dying_child(monkeypatch, sig)
    src = corpus_dir / "good.gguf"
    out = tmp_path / "out.gguf"
    result = invoke(["quantize", str(src), str(out), "--type", "Q8_0"])
    line = assert_clean_failure(result, names=src, expect=rf"quantizer crashed \({sig}\)", codes=(1,))
    assert "blk.0.attn_q.weight" in line and re.search(hint, line), line
    assert not out.exists() and not temp_leftovers(tmp_path)


def test_llama_cpp_really_aborts_on_what_the_validator_refuses(corpus_dir: Path) -> None:
    """The corpus case is real: llama.cpp itself dies of SIGABRT on block_count 0 (GGML_ASSERT); corral refuses
    the file before llama.cpp sees it (test_gguf_inputs)."""
    pytest.importorskip("llama_cpp")
    code = ("import sys, llama_cpp; p = llama_cpp.llama_model_default_params(); p.n_gpu_layers = 0; "
            "llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), p)")
    run = subprocess.run([sys.executable, "-c", code, str(corpus_dir / "zero_block_count.gguf")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode < 0 and quantize_child.signal_name(run.returncode) == "SIGABRT", run.stderr[-500:]
    assert "n_layer_all > 0" in run.stderr


def test_plan_routes_around_a_crashing_amx_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An AMX machine whose probe child segfaults: `corral plan` plans with extra buffers off, says so once,
    and the verdict (with the signal) is cached for `corral info --hardware`."""
    model = cpu_probe.probe_model(tmp_path / "q4k.gguf", [T.Q4_K, T.Q6_K])
    monkeypatch.setattr(hardware, "cpu_info", lambda: (AMX_FLAGS, "Test Sapphire Rapids"))
    runs: list[str] = []

    def segv(buffer: str, flags: object) -> list[str]:
        runs.append(buffer)
        return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]

    monkeypatch.setattr(cpu_probe, "probe_command", segv)
    result = invoke(["plan", str(model), "--json"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["use_extra_bufts"] is False and "--no-repack" in plan["llama_cli_args"]
    assert sum("AMX" in w and "crashed" in w for w in plan["warnings"]) == 1
    assert runs == ["AMX"]
    again = invoke(["plan", str(model), "--json"])
    assert json.loads(again.stdout)["use_extra_bufts"] is False and runs == ["AMX"]  # cached, not re-run
    shown = invoke(["info", "--hardware", "--json"])
    assert shown.exit_code == 0, shown.stderr
    verdict = json.loads(shown.stdout)["cpu_buffers"]["AMX"]["verdict"]
    assert verdict["status"] == "broken" and verdict["signal"] == "SIGSEGV" and verdict["returncode"] == -11


@pytest.fixture(scope="module")
def mini_q4km(mini_gguf_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from corral.convert.quantize import quantize_gguf

    out = tmp_path_factory.mktemp("q4km") / "mini-q4km.gguf"
    quantize_gguf(mini_gguf_bf16, out, ftype="Q4_K_M", threads=2)
    return out


def test_ask_loads_without_extra_buffers_where_the_probe_crashed(mini_q4km: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`corral ask` on a Q4_K_M file on an AMX machine whose probe segfaults: the answer comes, llama.cpp is
    told use_extra_bufts = false, and the user reads why in one warning line."""
    pytest.importorskip("llama_cpp")
    import corral.app.runtime.engine as engine

    monkeypatch.setattr(hardware, "cpu_info", lambda: (AMX_FLAGS, "Test Sapphire Rapids"))
    monkeypatch.setattr(cpu_probe, "probe_command", lambda buffer, flags: [
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    seen: list[bool] = []
    real = engine.build_params

    def spy(settings: object, *args: object, **kwargs: object) -> object:
        seen.append(settings.use_extra_bufts)  # type: ignore[attr-defined]
        return real(settings, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "build_params", spy)
    result = invoke(["ask", "-m", str(mini_q4km), "--ctx", "256", "--max-tokens", "2", "--temperature", "0", "hi"])
    assert result.exit_code == 0, result.stderr
    assert seen == [False]
    assert sum("crashed a test run" in line for line in result.stderr.splitlines()) == 1, result.stderr
