"""CPU decode rates: the fit from timings, the cache, the child's failure paths, and the real child once."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from corral.convert.errors import InvalidFile
from corral.offload import cpu_measure
from corral.offload.cpu_measure import (
    SKELETON_TYPE,
    MeasureFailed,
    measure_rates,
    type_shape,
    with_measured_rates,
)
from corral.offload.cpu_rates import (
    TYPICAL_AVX2,
    CpuRates,
    Overhead,
    Timing,
    TypeRate,
    rates_from_json,
    type_rate,
)
from corral.offload.hardware import Hardware, hardware_from_json

ONE = Overhead(fixed_s=8e-4, per_layer_s=3e-5, per_vocab_s=4e-9)
ALL = Overhead(fixed_s=1.1e-3, per_layer_s=5e-5, per_vocab_s=3e-9)
TRUE = {"F16": (7e9, 12e9), "Q4_K": (15e9, 26e9), "Q6_K": (11e9, 20e9)}


@pytest.fixture(autouse=True)
def _measuring_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite switches measuring off (conftest); these tests inject a fake child or run the real one."""
    monkeypatch.delenv(cpu_measure.DISABLE_ENV, raising=False)


class FakeMachine:
    """Stands in for the child: seconds per token from known overheads and rates; records what it was asked."""

    def __init__(self, rates: dict[str, tuple[float, float]] = TRUE) -> None:
        self.rates = {**rates, SKELETON_TYPE: (TYPICAL_AVX2.rate(SKELETON_TYPE).one_thread,
                                               TYPICAL_AVX2.rate(SKELETON_TYPE).one_thread * 2)}
        self.calls: list[dict[str, Any]] = []

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(spec)
        out = {}
        for raw in spec["models"]:
            s = cpu_measure.Shape(**raw)
            one, both = self.rates[s.ggml_type]
            out[s.key] = {str(n): (ONE if n == 1 else ALL).seconds(s.n_layer, s.n_vocab)
                          + s.weights / (one if n == 1 else both) for n in spec["threads"]}
        return {"timings": out}


def _measure(machine: FakeMachine, types: list[str], cache: Path, extra: bool = True) -> tuple[Any, Any]:
    return measure_rates(types, cpu_name="Test CPU", threads=2, use_extra_bufts=extra, cache=cache, runner=machine)


def test_fit_recovers_rates_and_overheads(tmp_path: Path) -> None:
    rates, why = _measure(FakeMachine(), ["F16", "Q4_K"], tmp_path)
    assert why is None and rates.threads == 2 and rates.use_extra_bufts
    for got, want in ((rates.overhead_one, ONE), (rates.overhead_all, ALL)):
        for field in ("fixed_s", "per_layer_s", "per_vocab_s"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-6)
    for name in ("F16", "Q4_K"):
        r = rates.rate(name)
        assert (r.one_thread, r.all_threads) == pytest.approx(TRUE[name], rel=1e-6)
    assert rates.rate("Q6_K") is None


def test_cache_measures_each_type_once_per_setting(tmp_path: Path) -> None:
    machine = FakeMachine()
    _measure(machine, ["F16"], tmp_path)
    assert len(machine.calls) == 1
    assert {m["key"] for m in machine.calls[0]["models"]} == {"skeleton-1", "skeleton-layers", "skeleton-vocab",
                                                             "type-F16"}
    assert machine.calls[0]["threads"] == [1, 2] and machine.calls[0]["use_extra_bufts"] is True
    again, _ = _measure(machine, ["F16"], tmp_path)
    assert len(machine.calls) == 1 and again.rate("F16") is not None  # from the cache
    more, _ = _measure(machine, ["F16", "Q6_K"], tmp_path)  # only the new type, with the cached overhead
    assert [m["key"] for m in machine.calls[1]["models"]] == ["type-Q6_K"]
    assert (more.rate("Q6_K").one_thread, more.rate("Q6_K").all_threads) == pytest.approx(TRUE["Q6_K"], rel=1e-6)
    assert more.rate("F16") == again.rate("F16")
    _measure(machine, ["F16"], tmp_path, extra=False)  # extra buffers off: other kernels, measured again
    assert len(machine.calls) == 3 and machine.calls[2]["use_extra_bufts"] is False
    data = json.loads((tmp_path / cpu_measure.CACHE_FILE).read_text())
    assert len(data) == 2 and all("Test CPU" in k for k in data)


def test_failed_measurement_keeps_typical_rates(tmp_path: Path) -> None:
    def crash(spec: dict[str, Any]) -> dict[str, Any]:
        raise MeasureFailed("timing llama.cpp's CPU kernels failed (signal 11)")

    rates, why = _measure(crash, ["F16"], tmp_path)  # type: ignore[arg-type]
    assert rates is None and "signal 11" in why
    assert not (tmp_path / cpu_measure.CACHE_FILE).exists()
    garbage, why = _measure(lambda spec: {"timings": {}}, ["F16"], tmp_path)  # type: ignore[arg-type]
    assert garbage is None and "no time" in why


@pytest.mark.parametrize("rc,what", [(-11, "signal 11"), (1, "exit code 1")])
def test_child_failure_is_reported(monkeypatch: pytest.MonkeyPatch, rc: int, what: str) -> None:
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, rc, "", "boom\n"))
    with pytest.raises(MeasureFailed, match=what):
        cpu_measure.run_child({"models": []})


def test_child_timeout_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(*a: Any, **k: Any) -> None:
        raise subprocess.TimeoutExpired("x", 1)

    monkeypatch.setattr(subprocess, "run", slow)
    with pytest.raises(MeasureFailed, match="took over"):
        cpu_measure.run_child({"models": []}, timeout=1)




class _Plan:
    def __init__(self, kinds: tuple[str, ...], extra: bool = True) -> None:
        from corral.offload.plan import DevicePlan

        self.devices = tuple(DevicePlan(k, k, k, 1000 if k != "gpu-empty" else 0, 0, 0, 0, 1, 1.0) for k in kinds)
        self.use_extra_bufts = extra


def _profile() -> Any:
    from corral.convert.llama_family import LlamaHParams
    from corral.offload.catalog import ModelShape
    from corral.offload.profile import profile_from_shape

    return profile_from_shape(ModelShape("t", LlamaHParams(256, 2, 4, 4, 512, n_vocab=1024)), "Q4_K_M")


def test_rates_attach_only_to_detected_hardware_with_cpu_work(tmp_path: Path) -> None:
    machine = FakeMachine({**TRUE, "Q5_K": (9e9, 17e9), "Q8_0": (10e9, 19e9)})
    hw = Hardware(cpu_cores=2, cpu_name="Test CPU", measure_cpu=True)
    profile = _profile()
    same, why = with_measured_rates(replace(hw, measure_cpu=False), profile, _Plan(("cpu",)), cache=tmp_path,
                                    runner=machine)
    assert same.cpu_rates is None and why is None and not machine.calls
    gpu_only = _Plan(("gpu",))
    gpu_only.devices = tuple(replace(d, kind="gpu") for d in gpu_only.devices)
    assert with_measured_rates(hw, profile, gpu_only, cache=tmp_path, runner=machine)[0] is hw
    got, why = with_measured_rates(hw, profile, _Plan(("cpu",), extra=False), cache=tmp_path, runner=machine)
    wanted = cpu_measure.plan_types(profile, _Plan(("cpu",)))
    assert why is None and wanted and {t.name for t in got.cpu_rates.types} == set(wanted)
    assert got.cpu_rates.use_extra_bufts is False and machine.calls[0]["use_extra_bufts"] is False


def test_measurement_failure_becomes_a_plan_warning(tmp_path: Path) -> None:
    def crash(spec: dict[str, Any]) -> dict[str, Any]:
        raise MeasureFailed("timing llama.cpp's CPU kernels failed (signal 11)")

    hw = Hardware(cpu_cores=2, cpu_name="Test CPU", measure_cpu=True)
    same, why = with_measured_rates(hw, _profile(), _Plan(("cpu",)), cache=tmp_path, runner=crash)
    assert same is hw and "typical AVX2 rates" in why and "signal 11" in why


def test_disturbed_overhead_takes_off_at_most_half() -> None:
    big = Overhead(fixed_s=1.0, per_layer_s=0.0, per_vocab_s=0.0)  # skeletons timed while the cores were busy
    r = type_rate("Q4_K", Timing(2, 256, 10_000_000, 0.01, 0.004), big, big, threads=2)
    assert (r.one_thread, r.all_threads) == pytest.approx((2e9, 5e9))
    slower = type_rate("Q4_K", Timing(2, 256, 10_000_000, 0.01, 0.02), ONE, ALL, threads=2)
    assert slower.all_threads == slower.one_thread  # more threads read slower: others held the cores


def test_skeletons_slowed_by_other_processes_are_capped(tmp_path: Path) -> None:
    class Stormy(FakeMachine):
        def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
            out = super().__call__(spec)
            out["timings"]["skeleton-1"]["2"] = 0.18  # another process held a core for the whole run
            return out

    rates, _ = _measure(Stormy(), ["F16"], tmp_path)
    single = rates.overhead_one.seconds(1, 256)
    assert rates.overhead_all.seconds(1, 256) <= 2 * single * 1.01  # at most threads x one thread


def test_rates_scale_with_threads() -> None:
    r = CpuRates(4, True, ONE, ALL, (TypeRate("Q4_K", 10e9, 30e9),))
    assert r.weights_per_s("Q4_K", 1) == pytest.approx(10e9)
    assert r.weights_per_s("Q4_K", 4) == pytest.approx(30e9)
    assert 10e9 < r.weights_per_s("Q4_K", 2) < 20e9
    assert r.weights_per_s("Q4_K", 16) == pytest.approx(30e9)  # no more cores than measured
    typical = replace(r, measured=False)
    assert typical.weights_per_s("Q4_K", 16) == pytest.approx(16 * 10e9 * 0.75)  # keeps its efficiency
    assert r.weights_per_s("IQ2_XXS", 4) is None
    assert r.overhead(1) == ONE and r.overhead(8) == ALL


def test_rates_json_round_trip_and_hardware_file() -> None:
    r = CpuRates(2, False, ONE, ALL, (TypeRate("F16", 7e9, 12e9),))
    assert rates_from_json(json.loads(json.dumps(r.to_json()))) == r
    hw = Hardware(cpu_rates=r, measure_cpu=True)
    back = hardware_from_json(json.loads(json.dumps(hw.to_json())))
    assert back.cpu_rates == r and back.measure_cpu is False  # a described machine is never timed
    for bad in ({"threads": 0}, {"threads": 2, "overhead_one": [1, 2], "overhead_all": [0, 0, 0]},
                {"threads": 2, "overhead_one": [0, 0, 0], "overhead_all": [0, 0, 0], "types": {"F16": [1, -1]}}):
        with pytest.raises(InvalidFile):
            rates_from_json(bad)


def test_type_models_take_a_few_ms_per_token() -> None:
    for name in ("F32", "BF16", "Q8_0", "Q4_K", "Q2_K", "IQ2_XXS"):
        s = type_shape(name)
        assert s.ggml_type == name and 20e6 < s.weights < 50e6 and s.n_embd % 256 == 0 and s.n_ff % 256 == 0


def test_real_child_measures_positive_rates(tmp_path: Path) -> None:
    """The real child: builds the GGUFs, loads them with llama.cpp, times decoding (no timing asserts)."""
    pytest.importorskip("llama_cpp")
    rates, why = measure_rates(["Q8_0"], cpu_name="this CPU", threads=2, use_extra_bufts=True, cache=tmp_path)
    assert why is None and rates is not None, why
    r = rates.rate("Q8_0")
    assert all(math.isfinite(x) and x > 0 for x in (r.one_thread, r.all_threads))
    o = rates.overhead(1)
    assert all(math.isfinite(x) and x >= 0 for x in (o.fixed_s, o.per_layer_s, o.per_vocab_s)) and o.fixed_s > 0


def test_switched_off_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_measure.DISABLE_ENV, "off")
    machine = FakeMachine()
    hw = Hardware(cpu_cores=2, cpu_name="Test CPU", measure_cpu=True)
    assert with_measured_rates(hw, _profile(), _Plan(("cpu",)), cache=tmp_path, runner=machine) == (hw, None)
    assert not machine.calls
