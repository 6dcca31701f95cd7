"""The sampler's blocked pass (jkv.sampling.sample_tokens): the same tokens as sampling each row on its own, and no
[B, V] copy of the logits when B is not a multiple of the block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkv.sampling import _sample_rows, sample_tokens
from planner.memory import SAMPLER_ROWS


def _rows(b: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, vocab)) * 3, jnp.float32)
    temperature = jnp.asarray(np.where(rng.random(b) < 0.25, 0.0, rng.uniform(0.5, 1.5, b)), jnp.float32)
    top_k = jnp.asarray(np.where(rng.random(b) < 0.5, 0, rng.integers(1, vocab, b)), jnp.int32)
    top_p = jnp.asarray(np.where(rng.random(b) < 0.5, 1.0, rng.uniform(0.3, 0.99, b)), jnp.float32)
    seeds = jnp.asarray(rng.integers(0, 2**32, b, dtype=np.uint64).astype(np.uint32))
    counters = jnp.asarray(rng.integers(0, 500, b), jnp.int32)
    return logits, temperature, top_k, top_p, seeds, counters


@pytest.mark.parametrize("b", [SAMPLER_ROWS - 3, SAMPLER_ROWS, 2 * SAMPLER_ROWS, 3 * SAMPLER_ROWS + 5])
def test_blocks_match_rows_sampled_one_at_a_time(b):
    args = _rows(b, 97, seed=b)
    got = np.asarray(jax.jit(sample_tokens)(*args))
    one = jax.jit(_sample_rows)
    want = np.array([int(one(*(a[r : r + 1] for a in args))[0]) for r in range(b)])
    np.testing.assert_array_equal(got, want)
    greedy = np.asarray(args[1]) == 0
    np.testing.assert_array_equal(got[greedy], np.asarray(jnp.argmax(args[0], -1))[greedy])


def _step_temp(b: int, vocab: int) -> int:
    """Compiled scratch of a step-like function: logits made inside the jit, sampled, and returned (as the engine's
    step does)."""

    def step(h, w, *rest):
        logits = (h @ w).astype(jnp.float32)
        return sample_tokens(logits, *rest), logits

    rows = _rows(b, vocab)
    args = [jax.ShapeDtypeStruct((b, 16), jnp.float32), jax.ShapeDtypeStruct((16, vocab), jnp.float32)]
    args += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in rows[1:]]
    return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_no_padded_logits_copy():
    """One row past a multiple of the block costs no more scratch than the multiple (plus a block's worth): the
    padded version held a whole extra [B, V] float32 copy (CPU: 2.0 copies against 0.88)."""
    b, vocab = 8 * SAMPLER_ROWS, 4096
    copy = (b + 1) * vocab * 4
    assert _step_temp(b + 1, vocab) < _step_temp(b, vocab) + 0.1 * copy


@pytest.mark.parametrize("b", [SAMPLER_ROWS + 1, 3 * SAMPLER_ROWS - 7])
def test_same_tokens_as_the_padded_sampler_it_replaced(b):
    """scripts/bench_sampler.py times the two against each other after checking this on the device."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scripts.bench_sampler import padded_sample_tokens

    args = _rows(b, 211, seed=7 * b)
    np.testing.assert_array_equal(np.asarray(jax.jit(sample_tokens)(*args)),
                                  np.asarray(jax.jit(padded_sample_tokens)(*args)))  # fmt: skip
