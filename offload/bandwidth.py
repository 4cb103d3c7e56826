"""Measured read bandwidths (RAM, the model's disk, and what streaming got from it), cached per machine as JSON."""

from __future__ import annotations

import json
import mmap
import os
import tempfile
import time
from pathlib import Path
from typing import Any

BANDWIDTH_CACHE_FILE = "bandwidth-v2.json"  # v2: RAM read with every core (v1 files read with one)


def cache_dir() -> Path:
    """corral's cache folder (same rule as corral.app.locations: CORRAL_HOME, then XDG_CACHE_HOME)."""
    home = os.environ.get("CORRAL_HOME")
    if home:
        return Path(home).expanduser() / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "corral"


def _disk_key(path: Path) -> str:
    p = path if path.exists() else path.parent
    try:
        return f"disk:{os.stat(p).st_dev}"
    except OSError:
        return "disk:unknown"


def _read_cache(cache: Path | None) -> dict[str, Any]:
    f = (cache or cache_dir()) / BANDWIDTH_CACHE_FILE
    try:
        data = json.loads(f.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_bandwidth(path: str | Path | None = None, *, cache: Path | None = None) -> dict[str, float]:
    """Bandwidths measured earlier on this machine ({} when never measured)."""
    return _cached(_read_cache(cache), Path(path) if path else Path.cwd())


def _cached(data: dict[str, Any], where: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(data.get("ram"), (int, float)):
        out["ram"] = float(data["ram"])
    key = _disk_key(where)
    if isinstance(data.get(key), (int, float)):
        out["disk"] = float(data[key])
    streamed = data.get("stream-busy:" + key)
    if isinstance(streamed, (int, float)) and streamed > 0:
        out["disk"] = out["disk_streaming"] = float(streamed)  # measured while streaming: what streaming gets
    return out


def measure_bandwidth(path: str | Path | None = None, *, cache: Path | None = None,
                      force: bool = False) -> dict[str, float]:
    """RAM read and disk read bandwidth (bytes/s), measured once per machine/filesystem and cached as JSON."""
    where = Path(path) if path else Path.cwd()
    data = _read_cache(cache)
    have = {} if force else _cached(data, where)
    if "ram" in have and "disk" in have:
        return have
    if "ram" not in have:
        have["ram"] = measure_ram_bandwidth()
        data["ram"] = have["ram"]
    if "disk" not in have:
        disk = measure_disk_bandwidth(where)
        if disk:
            have["disk"] = disk
            data[_disk_key(where)] = disk
    _write_cache(data, cache)
    return have


STREAM_HISTORY = 5  # runs whose streaming speeds are kept; plans use their median


def record_stream_bandwidth(path: str | Path, speed: float, *, cache: Path | None = None) -> None:
    """The read speed a run streaming weights from `path` measured (bytes read per token / the time the disk had
    reads to do: the token's time less the prefetch thread's waits; keyed apart from the earlier bytes / time): later
    plans use the median of the last STREAM_HISTORY runs' speeds for the disk tier of that filesystem instead of
    the cold read. A median, not the last run: measured speeds of one disk differ by 1.5x between runs
    (BENCHMARKS.md), and one odd run should not move every later plan."""
    data = _read_cache(cache)
    key = "stream-busy:" + _disk_key(Path(path))
    kept = data.get(key + ":history")
    history = [float(x) for x in kept if isinstance(x, (int, float)) and x > 0] if isinstance(kept, list) else []
    history = [*history[-(STREAM_HISTORY - 1):], float(speed)]
    data[key + ":history"] = history
    data[key] = sorted(history)[len(history) // 2]
    _write_cache(data, cache)


def _write_cache(data: dict[str, Any], cache: Path | None) -> None:
    folder = cache or cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as fh:
            json.dump(data, fh)
        os.replace(fh.name, folder / BANDWIDTH_CACHE_FILE)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def measure_ram_bandwidth(nbytes: int = 256 * 1024**2, seconds: float = 0.4) -> float:
    """Read bandwidth of a large array summed by every CPU at once (numpy releases the GIL; one slice each):
    what decode threads can stream. One core alone reaches only part of it."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    parts = np.array_split(np.ones(nbytes // 8, dtype=np.float64), os.cpu_count() or 1)
    best = 0.0
    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(np.sum, parts))  # fault the pages in
        deadline = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, nbytes / (time.perf_counter() - t0))
            if time.perf_counter() > deadline:
                break
    return best


def measure_disk_bandwidth(path: Path, nbytes: int = 128 * 1024**2, seconds: float = 1.0) -> float | None:
    """Cold sequential read speed (see `timed_cold_read`): the model file itself if big enough, else a scratch file
    (page cache dropped)."""
    target = path if path.is_file() and path.stat().st_size >= nbytes else None
    scratch = None
    folder = path if path.is_dir() else path.parent
    try:
        if target is None:
            if not folder.is_dir():
                return None
            fd, name = tempfile.mkstemp(dir=folder, prefix=".corral-bw-")
            scratch = Path(name)
            chunk = os.urandom(1024 * 1024)
            with os.fdopen(fd, "wb") as fh:
                for _ in range(nbytes // len(chunk)):
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            target = scratch
        return timed_cold_read(target, nbytes, seconds)
    except OSError:
        return None
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)


MADV_POPULATE_READ = 22  # Linux 5.14+ (not in Python's mmap module before 3.13)
READ_CHUNK = 8 * 1024 * 1024


def timed_cold_read(target: Path, nbytes: int, seconds: float) -> float | None:
    """Bytes/s reading the first `nbytes` of `target` cold, as the streaming engine reads: populating a mapping
    advised MADV_HUGEPAGE (4 MiB requests) in 8 MiB pieces. Where the kernel lacks that, plain 8 MiB reads."""
    fd = os.open(target, os.O_RDONLY)
    try:
        nbytes = min(nbytes, os.fstat(fd).st_size)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_DONTNEED)  # only the range we read
        try:
            done, dt = _populate(fd, nbytes, seconds)
        except (OSError, ValueError, AttributeError):
            done, dt = _read(fd, nbytes, seconds)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_DONTNEED)
        return done / dt if done and dt > 0 else None
    finally:
        os.close(fd)


def _populate(fd: int, nbytes: int, seconds: float) -> tuple[int, float]:
    length = nbytes // mmap.PAGESIZE * mmap.PAGESIZE
    if length <= 0:
        raise ValueError("file smaller than a page")
    with mmap.mmap(fd, length, prot=mmap.PROT_READ) as m:
        m.madvise(mmap.MADV_HUGEPAGE)
        done, t0 = 0, time.perf_counter()
        while done < length and time.perf_counter() - t0 < seconds:
            n = min(READ_CHUNK, length - done)
            m.madvise(MADV_POPULATE_READ, done, n)
            done += n
        dt = time.perf_counter() - t0
        m.madvise(mmap.MADV_DONTNEED)
    return done, dt


def _read(fd: int, nbytes: int, seconds: float) -> tuple[int, float]:
    done, t0 = 0, time.perf_counter()
    while done < nbytes and time.perf_counter() - t0 < seconds:
        block = os.read(fd, READ_CHUNK)
        if not block:
            break
        done += len(block)
    return done, time.perf_counter() - t0
