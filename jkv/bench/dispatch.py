"""How long a jitted call holds the calling thread, against the number of array arguments it takes.

The engine's step takes ~150 parameter arrays, the pool arrays (donated) and a few inputs; this asks whether the
host's dispatch time grows with the argument count. `make_fn(n, donate)` is a jitted function of n small float32
arrays (each read once) whose first `donate` arguments are donated and returned, as the pools are; `time_dispatch`
checks its result against NumPy, then times back-to-back calls until each returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

from jkv.bench import CheckFailed

ARRAY_ELEMENTS = 16  # each argument's length: small, so the call's device work is negligible


def make_fn(n: int, donate: int):
    """f(donated..., kept...) -> (sum of the first element of every array, the donated arrays + 1)."""

    def f(*arrays):
        total = sum(a[0] for a in arrays)
        return total, tuple(a + 1.0 for a in arrays[:donate])

    return jax.jit(f, donate_argnums=tuple(range(donate)))


def time_dispatch(n: int, donate: int, calls: int, make: Callable[[int, int], Callable] = make_fn) -> float:
    """Median seconds until a call of `make(n, donate)` returns (not until its result is ready), over `calls`
    calls, each waited for before the next. Raises CheckFailed when the function's result is wrong."""
    rng = np.random.default_rng(n)
    host = [rng.standard_normal(ARRAY_ELEMENTS).astype(np.float32) for _ in range(n)]
    arrays = [jax.device_put(a) for a in host]
    fn = make(n, donate)
    total, new = fn(*arrays)
    want = sum(float(a[0]) for a in host)
    if not np.isclose(float(total), want, rtol=1e-5, atol=1e-5):
        raise CheckFailed(f"wrong result for n={n}: {float(total)} != {want}")
    arrays[:donate] = new
    held = []
    for _ in range(calls):
        t0 = time.perf_counter()
        total, new = fn(*arrays)
        held.append(time.perf_counter() - t0)
        arrays[:donate] = new
        total.block_until_ready()
    return float(np.median(held))
