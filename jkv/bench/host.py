"""Where the engine's host time goes: a cProfile of the engine loop on a model whose device work is tiny.

`host_proxy_model` has GPT-2's structure and argument count (12 layers: 148 parameter arrays, 24 pool arrays) but a
width of 64 and a 512-token vocabulary, so the host side of a step (scheduling, block bookkeeping, building inputs,
dispatching the jitted step, reading tokens, building outputs) dominates. `profile_loop` runs one seeded mixed
workload three times on one engine: a warm-up (compiles every step shape), a timed pass and a pass under cProfile.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import jkv
from jkv.bench.serving import Workload, run_to_end

PROXY_VOCAB = 512
PROXY_WIDTH = 64


def host_proxy_model(layers: int) -> jkv.Model:
    """A random bfloat16 GPT-2 of `layers` layers, 64 wide, one head, a 512-token vocabulary."""
    from jkv.weights import random_params
    from kvspec.config import ModelConfig

    cfg = ModelConfig("host-proxy", vocab_size=PROXY_VOCAB, n_positions=1024, n_embd=PROXY_WIDTH, n_layer=layers,
                      n_head=1)  # fmt: skip
    return jkv.Model(cfg, random_params(cfg, "bfloat16"), "bfloat16", "host-proxy")


def host_workload(n: int, vocab: int, seed: int = 0) -> Workload:
    """n requests of 8-199 prompt and 8-299 output tokens, seeded."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, int(rng.integers(8, 200))).tolist(), int(rng.integers(8, 300)))
            for _ in range(n)]  # fmt: skip


class HostProfile(NamedTuple):
    """Engine steps per pass, the untimed-by-the-profiler seconds per step, and the profiler's stats."""

    steps: int
    seconds_per_step: float
    stats: pstats.Stats


def profile_loop(eng: jkv.Engine, reqs: Workload, finished_only: bool = True) -> HostProfile:
    """Warm-up pass, timed pass, then a pass under cProfile (module docstring)."""
    run_to_end(eng, reqs, finished_only)  # compiles every step shape
    t0 = time.perf_counter()
    steps = run_to_end(eng, reqs, finished_only)
    per_step = (time.perf_counter() - t0) / steps
    prof = cProfile.Profile()
    prof.enable()
    run_to_end(eng, reqs, finished_only)
    prof.disable()
    return HostProfile(steps, per_step, pstats.Stats(prof))


def top_functions(stats: pstats.Stats, top: int) -> list[tuple[float, float, int, str]]:
    """(own seconds, cumulative seconds, calls, "file:line(function)") of the `top` functions by own time."""
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append((tottime, cumtime, ncalls, f"{Path(file).name}:{line}({fn})"))
    rows.sort(reverse=True)
    return rows[:top]
