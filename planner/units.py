"""Byte sizes in and out: "24GB" (powers of 10), "24GiB" (powers of 2), and human-readable printing."""

from __future__ import annotations

import math
import re

from planner.plan import PlanError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}  # fmt: skip

MAX_DEVICE_BYTES = 2**50  # 1 PiB: far above any accelerator's memory, so a typo like 1e30 is caught

_SIZE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Parse a byte size: B/KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2; a bare number is bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise PlanError(f"cannot read size {text!r}: write a number with a unit, like 24GB, 24GiB or 512MiB.")
        value, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _UNITS:
            raise PlanError(f"unknown unit {match.group(2)!r} in {text!r}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB.")
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size > MAX_DEVICE_BYTES:
        raise PlanError(f"size {text!r} is larger than any device's memory: give one device's memory, like 80GB.")
    if size <= 0:
        raise PlanError(f"size {text!r} must be positive.")
    return int(size)


def human_bytes(n: int | float) -> str:
    """`25769803776` -> `24.00 GiB` (binary units: what allocators and memory_stats() count in)."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
