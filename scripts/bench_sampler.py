#!/usr/bin/env python
"""The sampler's blocked pass on the device: jkv's in-place blocks against the padded lax.map it replaced.

    python scripts/bench_sampler.py [--batches 64,257,1024,4033] [--vocab 50257] [--iters 20]

Both run sample_tokens' per-block sampling (jkv.sampling._sample_rows) on the same float32 logits, inside a jitted
function that makes the logits and returns them (as the engine's step does). Tokens are checked equal before
timing; then warm-up, and the median of --iters timed calls (each blocked until ready). The compiled scratch
(XLA's temp) of each is printed beside it: the padded version copies [B, V] float32 logits when B is not a
multiple of the block.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def padded_sample_tokens(logits, temperature, top_k, top_p, seeds, counters):
    """The previous sampler: pad the rows to a multiple of SAMPLER_ROWS, reshape, lax.map over the blocks."""
    import jax
    import jax.numpy as jnp

    from jkv.sampling import SAMPLER_ROWS, _sample_rows

    b = logits.shape[0]
    if b <= SAMPLER_ROWS:
        return _sample_rows(logits, temperature, top_k, top_p, seeds, counters)
    n = -(-b // SAMPLER_ROWS)

    def blocks(a):
        a = jnp.pad(a, [(0, n * SAMPLER_ROWS - b)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(n, SAMPLER_ROWS, *a.shape[1:])

    args = tuple(blocks(a) for a in (logits, temperature, top_k, top_p, seeds, counters))
    return jax.lax.map(lambda a: _sample_rows(*a), args).reshape(-1)[:b]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="64,257,1024,4033")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jkv.sampling import sample_tokens

    def step_of(sampler):
        def step(x, *rest):
            logits = x * 1.0  # made inside the jit and returned, as in the engine's step
            return sampler(logits, *rest), logits

        return jax.jit(step)

    impls = {"in-place blocks (jkv)": step_of(sample_tokens), "padded lax.map (before)": step_of(padded_sample_tokens)}
    print(f"device: {jax.devices()[0].device_kind}, JAX {jax.__version__}, vocab {args.vocab}")
    print(f"{'batch':>6s}  {'sampler':24s} {'median ms':>10s} {'temp MiB':>9s}")
    rng = np.random.default_rng(0)
    for b in (int(x) for x in args.batches.split(",")):
        x = jnp.asarray(rng.normal(size=(b, args.vocab)) * 3, jnp.float32)
        rest = (jnp.asarray(rng.uniform(0.5, 1.5, b), jnp.float32), jnp.asarray(rng.integers(0, 50, b), jnp.int32),
                jnp.asarray(rng.uniform(0.5, 1.0, b), jnp.float32),
                jnp.asarray(rng.integers(0, 2**31, b), jnp.uint32), jnp.zeros(b, jnp.int32))  # fmt: skip
        tokens = {name: np.asarray(fn(x, *rest)[0]) for name, fn in impls.items()}
        first, second = tokens.values()
        if not np.array_equal(first, second):
            raise SystemExit(f"batch {b}: the two samplers disagree on {int((first != second).sum())} rows.")
        for name, fn in impls.items():
            temp = fn.lower(x, *rest).compile().memory_analysis().temp_size_in_bytes
            for _ in range(3):
                jax.block_until_ready(fn(x, *rest))
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                jax.block_until_ready(fn(x, *rest))
                times.append(time.perf_counter() - t)
            print(f"{b:6d}  {name:24s} {1e3 * statistics.median(times):10.3f} {temp / 2**20:9.1f}")


if __name__ == "__main__":
    main()
