"""The memory this process may really use: the tightest memory cgroup limit (v1 or v2) on the way from the
process's cgroup up to the hierarchy's root. Containers and systemd units (MemoryMax=) are cgroups."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# cgroup v1 writes "no limit" as PAGE_COUNTER_MAX × page size, rounded: anything this large means unlimited.
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryLimit:
    """One cgroup's memory limit and what its members use now (page cache that can be dropped excluded)."""

    limit: int
    usage: int
    version: int  # 1 or 2
    cgroup: str  # the cgroup's path inside its hierarchy, e.g. "/system.slice/corral.service"
    anon: int = 0  # anonymous memory of its members (what no page-cache trick can make room in)

    @property
    def available(self) -> int:
        return max(0, self.limit - self.usage)

    @property
    def source(self) -> str:
        return f"cgroup v{self.version} {self.cgroup}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _memberships(text: str) -> tuple[str | None, str | None]:
    """(v1 memory controller path, v2 unified path) from /proc/<pid>/cgroup."""
    v1 = v2 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _chain(mount: Path, cgroup: str) -> list[tuple[Path, str]]:
    """The cgroup's folder and each ancestor's, deepest first. Inside a container the mount's root is the
    container's own cgroup, so the host-side path may not exist: then the mount root stands for it."""
    parts = [p for p in cgroup.split("/") if p]
    chain = []
    for depth in range(len(parts), -1, -1):
        rel = "/" + "/".join(parts[:depth])
        folder = mount.joinpath(*parts[:depth])
        if folder.is_dir():
            chain.append((folder, rel))
    return chain


def _v1(mount: Path, cgroup: str) -> MemoryLimit | None:
    best: MemoryLimit | None = None
    for folder, rel in _chain(mount, cgroup):
        limit = _int(_read(folder / "memory.limit_in_bytes"))
        if limit is None or limit >= _V1_UNLIMITED:
            continue
        if best is None or limit < best.limit:
            usage = _int(_read(folder / "memory.usage_in_bytes")) or 0
            stat = _stat(folder / "memory.stat")
            cache = stat.get("total_inactive_file", stat.get("inactive_file", 0))
            best = MemoryLimit(limit, max(0, usage - cache), 1, rel, stat.get("total_rss", stat.get("rss", 0)))
    return best


def _v2(mount: Path, cgroup: str) -> MemoryLimit | None:
    best: MemoryLimit | None = None
    for folder, rel in _chain(mount, cgroup):
        limit = _int(_read(folder / "memory.max"))  # "max" (no limit) reads as None
        if limit is None:
            continue
        if best is None or limit < best.limit:
            usage = _int(_read(folder / "memory.current")) or 0
            stat = _stat(folder / "memory.stat")
            best = MemoryLimit(limit, max(0, usage - stat.get("inactive_file", 0)), 2, rel, stat.get("anon", 0))
    return best


def cgroup_memory_limit(root: Path | str = "/", pid: int | str = "self") -> MemoryLimit | None:
    """The tightest memory cgroup limit that applies to `pid` (None: no limit). `root` is where /proc and /sys
    are found (tests pass a fake tree)."""
    base = Path(root)
    text = _read(base / "proc" / str(pid) / "cgroup")
    if text is None:
        return None
    v1_path, v2_path = _memberships(text)
    sys_cg = base / "sys" / "fs" / "cgroup"
    found = []
    if v1_path is not None and (sys_cg / "memory").is_dir():
        found.append(_v1(sys_cg / "memory", v1_path))
    if v2_path is not None:
        for mount in (sys_cg, sys_cg / "unified"):  # pure v2, or the hybrid layout's unified mount
            if (mount / "cgroup.controllers").is_file():
                found.append(_v2(mount, v2_path))
                break
    limits = [f for f in found if f is not None]
    return min(limits, key=lambda m: m.limit) if limits else None


__all__ = ["MemoryLimit", "cgroup_memory_limit"]
