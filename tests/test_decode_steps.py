"""Multi-step decode (`StepRunner.run_decode_steps`): K decode steps in one device call against K single steps.

Rows run different numbers of steps (0 .. K), cross block boundaries inside the call and sample with temperature,
so the per-step positions, slots, sampling counters and fed-back tokens all have to be right for the tokens and
the pools to match the single-step runs exactly.
"""

import jax
import numpy as np
import pytest

from jkv.kv_cache import allocate_pools
from jkv.runner import StepRunner, bucket, build_inputs
from jkv.weights import random_params
from kvspec.config import ModelConfig

BS = 8


@pytest.fixture(scope="module")
def setup():
    config = ModelConfig("tiny-d64", vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=2)
    params = random_params(config, "float32", seed=3)
    for i in range(config.n_layer):  # make every token depend on the cached context (see test_engine_kernels)
        params[f"h_{i}"]["attn"]["c_attn"]["kernel"] = params[f"h_{i}"]["attn"]["c_attn"]["kernel"] * 10
        params[f"h_{i}"]["attn"]["c_proj"]["kernel"] = params[f"h_{i}"]["attn"]["c_proj"]["kernel"] * 20
    return config, params


def _filled_pools(config, num_blocks, seed, kv_dtype="float32"):
    pools = allocate_pools(config, num_blocks, BS, kv_dtype)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jax.numpy.asarray(rng.standard_normal(a.shape).astype(a.dtype))
                        if a.dtype.kind == "f" else a, pools)  # fmt: skip


def _rows(contexts, steps, rng):
    """Per row: (token, context, a block table with room for its steps, temperature, top_k, top_p, seed, counter)."""
    rows, nxt = [], 1
    for ctx, k in zip(contexts, steps):
        need = -(-(ctx + max(k, 1)) // BS)
        table = list(range(nxt, nxt + need))
        nxt += need
        rows.append(([int(rng.integers(0, 256))], ctx, table, 0.9, 0, 1.0, int(rng.integers(0, 2**31)), ctx % 5))
    return rows, nxt


@pytest.mark.parametrize("backend,kv_dtype,greedy", [
    ("reference", "float32", False),
    ("interpret", "float32", False),  # the fused write-and-attend kernel inside the loop
    ("reference", "int8", True),  # quantized pool: the scatter path, greedy
])  # fmt: skip
def test_multi_step_equals_single_steps(setup, backend, kv_dtype, greedy):
    config, params = setup
    rng = np.random.default_rng(11)
    k_steps = 5
    contexts = [3, 6, 13, 30, 7]
    steps = [5, 2, 0, 5, 1]  # rows stop at different steps; one runs none
    rows, used = _rows(contexts, steps, rng)
    num_blocks = used + 2
    width = bucket(max(len(r[2]) for r in rows))
    batch = bucket(len(rows))
    runner = StepRunner(params, config, block_size=BS, backend=backend, token_slots=2 * batch)
    prev = runner.zero_tokens()

    # K single steps, each row stopping after its own count
    pools = _filled_pools(config, num_blocks, 4, kv_dtype)
    want = np.zeros((k_steps, len(rows)), np.int32)
    cur = [r[0][0] for r in rows]
    for j in range(k_steps):
        live = [i for i, k in enumerate(steps) if j < k]
        step_rows = [([cur[i]], rows[i][1] + j, rows[i][2], *rows[i][3:7], rows[i][7] + j) for i in live]
        x = build_inputs(step_rows, block_size=BS, chunk=1, width=width, batch=batch)
        toks, _, pools, _ = runner.run_step(pools, x, prev, decode=True, greedy=greedy)
        for r, i in enumerate(live):
            cur[i] = want[j, i] = int(toks[r])
    want_pools = jax.device_get(pools)

    pools = _filled_pools(config, num_blocks, 4, kv_dtype)
    x = build_inputs(rows, block_size=BS, chunk=1, width=width, batch=batch)
    x = type(x)(**{**x.__dict__, "query_lens": np.asarray(steps + [0] * (batch - len(rows)), np.int32)})
    out, pools, buf = runner.run_decode_steps(pools, x, prev, num_steps=k_steps, greedy=greedy)
    out = np.asarray(out)[:, : len(rows)]
    for i, k in enumerate(steps):
        np.testing.assert_array_equal(out[:k, i], want[:k, i], err_msg=f"row {i}")
        last = want[k - 1, i] if k else rows[i][0][0]
        assert int(buf[i]) == last, f"row {i}: token buffer holds {int(buf[i])}, its last token is {last}"
    got_pools = jax.device_get(pools)
    for a, b in zip(jax.tree.leaves(got_pools), jax.tree.leaves(want_pools)):
        np.testing.assert_array_equal(np.asarray(a)[1:], np.asarray(b)[1:])  # block 0 is the null block


def test_multi_step_reads_first_token_from_buffer(setup):
    """src_rows >= 0: the first step's token comes from the previous call's token buffer, as in run_step."""
    config, params = setup
    rng = np.random.default_rng(2)
    rows, used = _rows([4, 9], [3, 3], rng)
    runner = StepRunner(params, config, block_size=BS, backend="reference", token_slots=4)
    buf = jax.numpy.asarray([rows[1][0][0], rows[0][0][0], 0, 0], jax.numpy.int32)  # the tokens, swapped over
    swapped = [([255], *r[1:]) for r in rows]  # host tokens that must not be used
    x = build_inputs(swapped, block_size=BS, chunk=1, width=2, batch=2, src_rows=[1, 0])
    x = type(x)(**{**x.__dict__, "query_lens": np.asarray([3, 3], np.int32)})
    got, _, _ = runner.run_decode_steps(_filled_pools(config, used + 1, 1), x, buf, num_steps=3, greedy=True)
    x = build_inputs(rows, block_size=BS, chunk=1, width=2, batch=2)
    x = type(x)(**{**x.__dict__, "query_lens": np.asarray([3, 3], np.int32)})
    want, _, _ = runner.run_decode_steps(_filled_pools(config, used + 1, 1), x, runner.zero_tokens(), num_steps=3,
                                         greedy=True)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
