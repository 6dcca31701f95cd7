"""The sampler's blocked pass on the device: jkv's in-place blocks against the padded lax.map it replaced.

Both run sample_tokens' per-block sampling (`jkv.sampling._sample_rows`) on the same float32 logits, inside a
jitted function that makes the logits and returns them (as the engine's step does). `compare` checks the two
samplers' tokens equal before timing, then reports each one's median time and compiled scratch (XLA's temp): the
padded version copies [B, V] float32 logits when B is not a multiple of the block.
"""

from __future__ import annotations

import statistics
import time

from jkv.bench import CheckFailed

WARM_CALLS = 3


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


def samplers() -> dict:
    """Name -> jitted step(logits_in, temperature, top_k, top_p, seeds, counters) -> (tokens, logits)."""
    import jax

    from jkv.sampling import sample_tokens

    def step_of(sampler):
        def step(x, *rest):
            logits = x * 1.0  # made inside the jit and returned, as in the engine's step
            return sampler(logits, *rest), logits

        return jax.jit(step)

    return {
        "in-place blocks (jkv)": step_of(sample_tokens),
        "padded lax.map (before)": step_of(padded_sample_tokens),
    }


def compare(batch: int, vocab: int, iters: int, rng) -> list[tuple[str, float, int]]:
    """(sampler, median seconds per call, compiled temp bytes) for both samplers at one batch, on inputs drawn
    from `rng` (a NumPy Generator), after checking that they sample the same tokens (CheckFailed otherwise)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(rng.normal(size=(batch, vocab)) * 3, jnp.float32)
    rest = (jnp.asarray(rng.uniform(0.5, 1.5, batch), jnp.float32), jnp.asarray(rng.integers(0, 50, batch), jnp.int32),
            jnp.asarray(rng.uniform(0.5, 1.0, batch), jnp.float32),
            jnp.asarray(rng.integers(0, 2**31, batch), jnp.uint32), jnp.zeros(batch, jnp.int32))  # fmt: skip
    impls = samplers()
    tokens = {name: np.asarray(fn(x, *rest)[0]) for name, fn in impls.items()}
    first, second = tokens.values()
    if not np.array_equal(first, second):
        raise CheckFailed(f"batch {batch}: the two samplers disagree on {int((first != second).sum())} rows.")
    out = []
    for name, fn in impls.items():
        temp = fn.lower(x, *rest).compile().memory_analysis().temp_size_in_bytes
        for _ in range(WARM_CALLS):
            jax.block_until_ready(fn(x, *rest))
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            jax.block_until_ready(fn(x, *rest))
            times.append(time.perf_counter() - t)
        out.append((name, statistics.median(times), temp))
    return out
