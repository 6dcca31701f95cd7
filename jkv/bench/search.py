"""The real maximum decode batch, found with as few candidates as possible, and its report against the plan.

`search_max_batch` knows nothing of devices: it asks a `fits(B)` callable (in `jkv.bench.memory`, a fresh process
per candidate under the plan's memory cap) and assumes only that fitting is monotone in B. Each candidate on a real
card costs a process start, a compilation and, above the threshold, a slow failure (the allocator waits on every
allocation it refuses, and XLA's autotuner tries dozens), so the rules below spend few tries near the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

GROWTH = 1.25  # search_max_batch's default step above the last fit while no candidate has failed yet
ROW_GROWTH = 1.01  # the real-max search's step: calibrated plans are within a few sequences of the threshold
MAX_TRIES = 24  # candidates per row: a fresh process each, 15-30 s on an H200 (gpt2 / gpt2-xl)
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


class BatchSearch(NamedTuple):
    """What the search found: `real_max` is exact (int) or, when the cap was hit first, the bounds (largest B that
    fit, 0 if none; smallest B that failed, None if none did); `tries` is every (B, fitted, message) in order."""

    real_max: int | tuple[int, int | None]
    tries: list[tuple[int, bool, str]]
    cap_hit: bool

    @property
    def bounds(self) -> tuple[int, int | None]:
        """(largest B that fit, smallest B that failed); exact results give (real_max, real_max + 1)."""
        return self.real_max if isinstance(self.real_max, tuple) else (self.real_max, self.real_max + 1)


def search_max_batch(
    fits: Callable[[int], tuple[bool, str]],
    planned: int,
    *,
    first: int | None = None,
    growth: float = GROWTH,
    max_tries: int = MAX_TRIES,
    width: int = 1,
    fits_many: Callable[[list[int]], list[tuple[bool, str]]] | None = None,
    gallop_down: bool = False,
    gallop_up: bool = False,
) -> BatchSearch:
    """The largest decode batch B with fits(B) true, found from the plan's B with as few candidates as the rule allows.

    If the planned B fits, the next candidate is `first` (when it is above the plan; else the growth step), then B
    grows by `growth` (at least +1) until a candidate fails; then it bisects between the last fit and the first
    failure down to a gap of 1. If the planned B fails, it bisects between 0 and it. Assumes fits is monotone
    (fits for B means fits for every smaller B); never tries a B twice; stops after max_tries candidates.

    width > 1 tries up to `width` candidates per round through fits_many (default: fits on each in turn): the plan
    with `first`, then `width` growth steps, then `width` points splitting the gap evenly. width=1 is the rule above.

    gallop_down: when the planned B fails, try B - 1, B - 2, B - 4, ... until one fits, then bisect (a calibrated
    plan that over-promises does so by a few sequences, so this costs a few tries where halving from 0 costs ~log B).

    gallop_up: when the plan fits, grow from it by doubling offsets (B + 2, B + 4, B + 8, ...), each step at most
    the growth step, then bisect: a calibrated plan is a few sequences under the real maximum, so a failure comes
    within a few tries and leaves a gap of a few sequences to split, where 1 % steps leave ~1 % to split.
    """
    if planned < 1 or max_tries < 1 or width < 1:
        raise ValueError(f"planned={planned}, max_tries={max_tries} and width={width} must be at least 1.")
    fits_many = fits_many or (lambda bs: [fits(b) for b in bs])
    tries: list[tuple[int, bool, str]] = []
    lo, hi = 0, None

    def round_of(bs: list[int]) -> None:
        nonlocal lo, hi
        bs = bs[: max_tries - len(tries)]
        results = fits_many(bs)
        tries.extend((b, bool(ok), msg) for b, (ok, msg) in zip(bs, results, strict=True))
        failed = [b for b, (ok, _) in zip(bs, results, strict=True) if not ok]
        hi = min([*failed, *([] if hi is None else [hi])], default=None)
        lo = max([lo, *(b for b, (ok, _) in zip(bs, results, strict=True) if ok and (hi is None or b < hi))])

    jump = first if first is not None and first > planned else None
    round_of([planned] + ([jump] if jump and width > 1 else []))
    if lo < planned:  # the plan over-promised: whatever else this round tried is above it too
        lo, hi = 0, min(hi, planned)
        k = 0
        while gallop_down and lo == 0 and hi > 1 and len(tries) < max_tries:
            steps = sorted({max(1, planned - 2**i) for i in range(k, k + width)}, reverse=True)
            k += width
            round_of([b for b in steps if b < hi])
    offset = 1  # gallop_up: the last offset from the plan tried
    while hi is None and len(tries) < max_tries:
        steps, b = [], lo
        for _ in range(width):
            if jump and jump not in [t[0] for t in tries] and jump > b:
                b = jump
            else:
                step = max(b + 1, int(b * growth))
                if gallop_up:
                    while planned + offset <= b:
                        offset *= 2
                    step = min(step, planned + offset)
                b = step
            steps.append(b)
        round_of(steps)
    while hi is not None and hi - lo > 1 and len(tries) < max_tries:
        round_of(sorted({lo + (hi - lo) * i // (width + 1) for i in range(1, width + 1)} - {lo}))
    exact = hi is not None and hi - lo == 1
    return BatchSearch(lo if exact else (lo, hi), tries, not exact)


def is_oom(msg: str) -> bool:
    """Whether a recorded failure reads as running out of device memory (anything else is a bug, not a limit)."""
    return any(m in msg for m in OOM_MARKERS)


def batch_report(search: BatchSearch, planned: int, cost: dict) -> dict:
    """Planned vs real maximum batch: the gap in sequences, %, and bytes (gap x one sequence's cost)."""
    lo, hi = search.bounds
    real = search.real_max if not search.cap_hit else None
    gap = lo - planned if real is None else real - planned
    return {
        "planned": planned, "real": real, "bounds": [lo, hi], "cap_hit": search.cap_hit,
        "diff_seqs": gap, "diff_pct": 100 * gap / planned, "diff_bytes": gap * cost["total"],
        "seq_bytes": cost, "plan_fit": search.tries[0][1] if search.tries else None,
        "tries": [{"batch": b, "ok": ok, "error": None if ok else msg, "oom": None if ok else is_oom(msg)}
                  for b, ok, msg in search.tries],
        "non_oom_failures": sum(1 for _, ok, msg in search.tries if not ok and not is_oom(msg)),
    }  # fmt: skip


def batch_cell(mb: dict) -> str:
    """The real maximum batch, or its bounds when the search stopped at its cap."""
    if mb["real"] is not None:
        return f"{mb['real']:,}"
    lo, hi = mb["bounds"]
    return f"[{lo:,}, {'?' if hi is None else f'{hi:,}'})"
