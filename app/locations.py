"""Where corral keeps its data and cache (read at call time; CORRAL_HOME overrides)."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def home() -> Path | None:
    value = os.environ.get("CORRAL_HOME")
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """Chat store, converted models."""
    root = home()
    return (root / "data") if root else _xdg("XDG_DATA_HOME", ".local/share") / "corral"


def cache_dir() -> Path:
    """Measured bandwidths, demo checkpoint."""
    root = home()
    return (root / "cache") if root else _xdg("XDG_CACHE_HOME", ".cache") / "corral"
