"""The memory cgroup limit (v1, v2, hybrid, containers, systemd units) and how the plan uses it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from corral.convert.units import GiB, MiB
from corral.offload import hardware
from corral.offload.hardware import Hardware, what_if
from corral.offload.memlimit import MemoryLimit, cgroup_memory_limit

V1_NO_LIMIT = "9223372036854771712"


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v1_group(root: Path, rel: str, limit: str, usage: int, inactive: int = 0) -> None:
    base = f"sys/fs/cgroup/memory{rel}".rstrip("/")
    _write(root, f"{base}/memory.limit_in_bytes", limit + "\n")
    _write(root, f"{base}/memory.usage_in_bytes", f"{usage}\n")
    _write(root, f"{base}/memory.stat", f"cache 5\ninactive_file 1\ntotal_inactive_file {inactive}\n")


def _v2_group(root: Path, mount: str, rel: str, limit: str, current: int, inactive: int = 0) -> None:
    base = f"{mount}{rel}".rstrip("/")
    _write(root, f"{mount}/cgroup.controllers", "cpu memory pids\n")
    _write(root, f"{base}/memory.max", limit + "\n")
    _write(root, f"{base}/memory.current", f"{current}\n")
    _write(root, f"{base}/memory.stat", f"anon 7\nfile 9\ninactive_file {inactive}\n")


def test_v1_limit_of_the_process_cgroup_minus_working_set(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "9:name=systemd:/\n4:memory:/docker/abc\n1:cpu:/\n0::/\n")
    _v1_group(tmp_path, "", V1_NO_LIMIT, 10 * GiB)
    _v1_group(tmp_path, "/docker", V1_NO_LIMIT, 3 * GiB)
    _v1_group(tmp_path, "/docker/abc", str(2 * GiB), 900 * MiB, inactive=300 * MiB)
    got = cgroup_memory_limit(tmp_path)
    assert got == MemoryLimit(2 * GiB, 600 * MiB, 1, "/docker/abc")
    assert got is not None and got.available == 2 * GiB - 600 * MiB and got.source == "cgroup v1 /docker/abc"


def test_anonymous_memory_of_the_group(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "4:memory:/a\n0::/b\n")
    _v1_group(tmp_path, "/a", str(5 * GiB), 3 * GiB)
    (tmp_path / "sys/fs/cgroup/memory/a/memory.stat").write_text("rss 7\ntotal_rss 123456\ntotal_cache 99\n")
    got = cgroup_memory_limit(tmp_path)
    assert got is not None and got.anon == 123456
    _v2_group(tmp_path, "sys/fs/cgroup/unified", "/b", str(2 * GiB), GiB)
    got = cgroup_memory_limit(tmp_path)
    assert got is not None and (got.version, got.anon) == (2, 7)  # "anon 7" in the fake memory.stat


def test_v1_parent_limit_is_tighter_than_child(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "4:memory:/user/job\n")
    _v1_group(tmp_path, "", V1_NO_LIMIT, 0)
    _v1_group(tmp_path, "/user", str(1 * GiB), 100)
    _v1_group(tmp_path, "/user/job", str(4 * GiB), 50)
    got = cgroup_memory_limit(tmp_path)
    assert got is not None and (got.limit, got.usage, got.cgroup) == (1 * GiB, 100, "/user")


def test_v1_inside_a_container_the_mount_root_is_the_own_cgroup(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host-side path, but the container sees its own cgroup at the mount root
    _write(tmp_path, "proc/self/cgroup", "4:memory:/process_api/80d96a\n")
    _v1_group(tmp_path, "", str(3 * GiB), GiB)
    got = cgroup_memory_limit(tmp_path)
    assert got is not None and (got.limit, got.cgroup) == (3 * GiB, "/")


def test_v1_without_any_limit_is_none(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "4:memory:/\n")
    _v1_group(tmp_path, "", V1_NO_LIMIT, GiB)
    assert cgroup_memory_limit(tmp_path) is None


def test_v2_systemd_unit_memory_max(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "0::/system.slice/corral.service\n")
    _v2_group(tmp_path, "sys/fs/cgroup", "", "max", 0)
    _v2_group(tmp_path, "sys/fs/cgroup", "/system.slice", "max", 0)
    _v2_group(tmp_path, "sys/fs/cgroup", "/system.slice/corral.service", str(8 * GiB), 3 * GiB, inactive=GiB)
    got = cgroup_memory_limit(tmp_path)
    assert got == MemoryLimit(8 * GiB, 2 * GiB, 2, "/system.slice/corral.service", anon=7)
    assert got is not None and got.source == "cgroup v2 /system.slice/corral.service"


def test_v2_slice_limit_applies_to_its_units(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "0::/user.slice/user-1000.slice/app.scope\n")
    _v2_group(tmp_path, "sys/fs/cgroup", "/user.slice", str(6 * GiB), GiB)
    _v2_group(tmp_path, "sys/fs/cgroup", "/user.slice/user-1000.slice", "max", 0)
    _v2_group(tmp_path, "sys/fs/cgroup", "/user.slice/user-1000.slice/app.scope", "max", 0)
    got = cgroup_memory_limit(tmp_path)
    assert got is not None and (got.limit, got.cgroup) == (6 * GiB, "/user.slice")


def test_hybrid_layout_takes_the_tighter_of_v1_and_v2(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "4:memory:/a\n0::/b\n")
    _v1_group(tmp_path, "/a", str(5 * GiB), 0)
    _v2_group(tmp_path, "sys/fs/cgroup/unified", "/b", str(3 * GiB), 0)
    got = cgroup_memory_limit(tmp_path)
    assert got is not None and (got.limit, got.version) == (3 * GiB, 2)


def test_no_proc_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory_limit(tmp_path) is None
    _write(tmp_path, "proc/self/cgroup", "0::/x\n")  # v2 membership, no cgroup2 mount
    assert cgroup_memory_limit(tmp_path) is None


def test_detect_hardware_uses_the_cgroup_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cgroup_memory_limit", lambda: MemoryLimit(2 * GiB, 512 * MiB, 1, "/box"))
    monkeypatch.setattr(hardware, "probe_gpus", lambda: ())
    hw = hardware.detect_hardware(measure=False)
    assert hw.ram_total == 2 * GiB and hw.ram_available <= 2 * GiB - 512 * MiB
    assert hw.ram_limit == "cgroup v1 /box"
    monkeypatch.setattr(hardware, "cgroup_memory_limit", lambda: None)
    free = hardware.detect_hardware(measure=False)
    assert free.ram_limit == "machine" and free.ram_total > 2 * GiB


def test_what_if_ram_names_the_flag_and_round_trips() -> None:
    hw = what_if(Hardware(), ram=64 * GiB)
    assert hw.ram_limit == "--ram"
    back = hardware.hardware_from_json(json.loads(json.dumps(replace(hw, ram_limit="cgroup v2 /u").to_json())))
    assert back.ram_limit == "cgroup v2 /u"


def test_plan_says_which_limit_applies(tmp_path: Path) -> None:
    from corral.app.cli.main import cli

    hw = replace(Hardware(ram_total=3 * GiB, ram_available=2 * GiB, cpu_threads=2, cpu_cores=2),
                 ram_limit="cgroup v1 /box", source="file hw.json")
    (tmp_path / "hw.json").write_text(json.dumps(hw.to_json()))
    args = ["plan", "llama-3.1-8b", "--quant", "Q4_K_M", "--hardware", str(tmp_path / "hw.json")]
    data = json.loads(CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False).output)
    assert data["ram_limit"] == "cgroup v1 /box"
    text = CliRunner().invoke(cli, args, catch_exceptions=False, terminal_width=200).output
    assert "limit of cgroup v1 /box" in text
