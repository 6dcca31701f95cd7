"""What the device did, read back: jax.profiler traces -> GPU kernel intervals, busy time, per-kernel tables; and
whole-pool copies in a compiled step's HLO text (there should be none: the pools are updated in place).

An event is `(name, start_ns, end_ns)`, one kernel execution on a GPU stream.
"""

from __future__ import annotations

import glob
import itertools
import re
from collections import defaultdict
from pathlib import Path

Event = tuple[str, int, int]

GAP_BINS = {"<1us": (0, 1e3), "1-5us": (1e3, 5e3), ">=5us": (5e3, float("inf"))}  # idle gaps by size, ns


def trace_files(trace_dir: Path) -> list[str]:
    """The .xplane.pb files under trace_dir, oldest first."""
    return sorted(glob.glob(str(Path(trace_dir) / "**" / "*.xplane.pb"), recursive=True))


def kernel_events(trace_dir: Path) -> list[Event]:
    """(name, start_ns, end_ns) of every event on the GPU planes' stream lines of the newest trace under trace_dir.

    Raises FileNotFoundError when no trace was written there.
    """
    from jax.profiler import ProfileData

    files = trace_files(trace_dir)
    if not files:
        raise FileNotFoundError(f"no .xplane.pb under {trace_dir}: the trace was not written.")
    out = []
    for plane in ProfileData.from_file(files[-1]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # Kernel launches sit on the stream lines; skip XLA's op/module summary lines (they overlap them).
            if "stream" not in line.name.lower():
                continue
            out.extend((ev.name, ev.start_ns, ev.end_ns) for ev in line.events)
    return out


def plane_names(trace_dir: Path) -> list[tuple[str, list[str]]]:
    """(plane, its line names) of the newest trace: what to look at when no kernel events were found."""
    from jax.profiler import ProfileData

    files = trace_files(trace_dir)
    return (
        [(p.name, [ln.name for ln in p.lines]) for p in ProfileData.from_file(files[-1]).planes]
        if files
        else []
    )


def busy_ns(events: list[Event]) -> int:
    """Length of the union of the events' intervals."""
    total, end = 0, -1
    for _, s, e in sorted(events, key=lambda x: x[1]):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def span_ns(events: list[Event]) -> int:
    """From the first event's start to the last one's end (0 without events)."""
    return max(e for _, _, e in events) - min(s for _, s, _ in events) if events else 0


def short(name: str) -> str:
    """Group names: drop numeric suffixes XLA adds to fusions and kernels (fusion.123 -> fusion)."""
    return re.sub(r"(_\d+|\.\d+)+$", "", name)


def kernel_table(events: list[Event], steps: int) -> list[dict]:
    """Kernel time and launches per step, grouped by `short` name, largest first."""
    groups = defaultdict(lambda: [0, 0])
    for name, s, e in events:
        groups[short(name)][0] += e - s
        groups[short(name)][1] += 1
    return [{"name": n, "us_per_step": t / steps / 1e3, "count_per_step": c / steps}
            for n, (t, c) in sorted(groups.items(), key=lambda kv: -kv[1][0])]  # fmt: skip


def gaps(events: list[Event]) -> list[tuple[int, str, str]]:
    """(idle ns before a kernel, the kernel before, the kernel after) between consecutive kernels in start order."""
    ordered = sorted(events, key=lambda ev: ev[1])
    return [(b[1] - a[2], a[0], b[0]) for a, b in itertools.pairwise(ordered)]


def gap_us_per_step(events: list[Event], steps: int) -> dict[str, float]:
    """Where the idle time sits: gaps between consecutive kernels summed by size (`GAP_BINS`), µs per step."""
    found = gaps(events)
    return {b: sum(g for g, _, _ in found if lo <= g < hi) / steps / 1e3 for b, (lo, hi) in GAP_BINS.items()}


def one_step_in_order(events: list[Event], steps: int) -> list[dict]:
    """One step's kernels in launch order, from the middle of the traced window: name, µs, gap before it (µs)."""
    ordered = sorted(events, key=lambda ev: ev[1])
    per_step = len(ordered) // steps
    mid = ordered[(steps // 2) * per_step : (steps // 2 + 1) * per_step + 1]
    return [{"name": short(nm), "us": (e - s) / 1e3, "gap_us": (s - mid[i - 1][2]) / 1e3 if i else None}
            for i, (nm, s, e) in enumerate(mid)]  # fmt: skip


def pool_copies(hlo: str, pool_shape) -> list[str]:
    """HLO lines that copy a pool-sized buffer (there should be none: the pools are updated in place)."""
    dims = ",".join(str(d) for d in pool_shape)
    return [ln.strip()[:160] for ln in hlo.splitlines() if re.search(r"= \S+\[" + dims + r"\]\S* copy\(", ln)]
