"""Sizes and rates as people type and read them: one rule for every command.

`GB`, `MB`, `KB`, `TB` are powers of 1000 (how disks and bandwidths are quoted); `GiB`, `MiB`, … and the
bare letters `G`, `M`, `K`, `T` are powers of 1024 (how RAM and VRAM are sold and how `ls -h` counts).
"""

from __future__ import annotations

import re

from .errors import UsageError

KiB = 1024
MiB = 1024**2
GiB = 1024**3

SIZE_HELP = "G/GiB = 1024^3 bytes, GB = 10^9"

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)
_POW = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def is_size(text: str) -> bool:
    """Whether `text` reads as a size (a number with an optional unit)."""
    return bool(_SIZE_RE.match(str(text)))


def parse_size(text: str) -> int:
    """'24GiB' or '24G' -> 24 * 1024^3; '24GB' -> 24 * 10^9; a bare number is bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 24GiB, 128GB, 512MiB; {SIZE_HELP})")
    value, prefix, binary, b = float(m[1]), m[2].lower(), m[3], m[4]
    if not prefix:
        return int(value)
    base = 1024 if (binary or not b) else 1000
    return int(value * base ** _POW[prefix])


def parse_rate(text: str) -> float:
    """'3GB/s' -> bytes per second (decimal units unless 'GiB/s' is written, as bandwidths are quoted)."""
    s = str(text).strip()
    if s.lower().endswith("/s"):
        s = s[:-2]
    m = _SIZE_RE.match(s)
    if not m:
        raise UsageError(f"not a bandwidth: {text!r} (examples: 3GB/s, 1008GB/s, 500MB/s)")
    value, prefix, binary = float(m[1]), m[2].lower(), m[3]
    rate = value * (1024 if binary else 1000) ** _POW[prefix]
    if rate <= 0:
        raise UsageError(f"bandwidth must be positive: {text!r}")
    return rate


def format_bytes(n: float) -> str:
    """Bytes as a short binary string: 1536 -> '1.5 KiB', 23.5 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover
