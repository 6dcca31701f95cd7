"""Bounded polling for the serve tests."""

from __future__ import annotations

import time


def wait_for(predicate, tries: int = 200, pause: float = 0.05) -> bool:
    """Whether `predicate()` came true within `tries` polls (bounded in count, not in measured time)."""
    for _ in range(tries):
        if predicate():
            return True
        time.sleep(pause)
    return False
