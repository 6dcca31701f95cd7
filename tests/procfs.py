"""What Linux's /proc says about a server's processes, for the serve tests: which processes a process started,
whether one is still running, and its command line."""

from __future__ import annotations

import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """The processes `pid` started, e.g. the engine process of --engine-process."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, each child before its own children."""
    out = []
    for child in children(pid):
        out += [child, *descendants(child)]
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (its parent ended before reaping it)


def process_group(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except FileNotFoundError:
        return f"{pid} (gone)"


def wait_for(predicate, tries: int = 200, pause: float = 0.05) -> bool:
    """Whether `predicate()` came true within `tries` polls (bounded in count, not in measured time)."""
    for _ in range(tries):
        if predicate():
            return True
        time.sleep(pause)
    return False
