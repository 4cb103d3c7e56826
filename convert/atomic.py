"""Atomic file output and disk-space checks.

Writers never touch the target path until the data is complete: they write to a
temporary file beside the target (same filesystem, so the final rename is atomic),
fsync it, then `os.replace` it into place. On any exception -- including
KeyboardInterrupt -- the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InsufficientDisk, OutputExists

# Keep a little slack so that the filesystem never fills to the last byte.
DISK_SLACK_BYTES = 64 * 1024 * 1024


def check_output_path(path: str | Path, *, force: bool) -> Path:
    """Refuse an existing output unless `force`; make sure the parent folder exists."""
    target = Path(path)
    if target.exists() and not force:
        raise OutputExists("output already exists (use --force to overwrite)", path=target)
    if target.exists() and target.is_dir():
        raise OutputExists("output path is a directory", path=target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def check_free_space(folder: str | Path, needed_bytes: int) -> None:
    """Raise InsufficientDisk when `folder`'s filesystem cannot hold `needed_bytes` more."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed_bytes + DISK_SLACK_BYTES > free:
        raise InsufficientDisk(
            f"not enough disk space: need {needed_bytes:,} bytes, {free:,} free",
            path=folder,
        )


def temp_path_beside(target: Path) -> Path:
    """A fresh, unique temporary path in the target's folder (created empty)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".corral-tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


def fsync_path(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success fsync and rename it to `target`, else delete it."""
    target = Path(target)
    tmp = temp_path_beside(target)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_outputs(targets: list[Path]) -> Iterator[list[Path]]:
    """Like `atomic_output` for a set of files (split GGUF shards): all appear or none."""
    temps = [temp_path_beside(t) for t in targets]
    try:
        yield temps
        for tmp in temps:
            fsync_path(tmp)
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
        for folder in {t.parent for t in targets}:
            _fsync_dir(folder)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
