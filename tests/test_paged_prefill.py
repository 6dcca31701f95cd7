"""Paged prefill/append attention: the jnp reference on hand-computed cases and against a float64 oracle, then
the Pallas kernel against the reference (interpret=True on CPU; JKV_TEST_GPU=1 runs it compiled on a GPU), for
every page kind: bf16/f16/f32, int8/fp8 and packed int4."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill import paged_prefill_attention, paged_prefill_attention_reference
from pallas_kernels.testing import INTERPRET, TOL, dense_from_case, make_case, rel_err

def oracle(case, window=None):
    k, v = dense_from_case(case)  # [B, Hkv, T, D]
    q = np.asarray(case.q.astype(jnp.float32), np.float64)  # [B, C, H, D]
    b, c, h, d = q.shape
    g = h // k.shape[1]
    out = np.zeros(q.shape)
    for i in range(b):
        ctx, ql = int(case.lengths[i]), int(case.query_lens[i])
        for t in range(ql):
            pos = ctx + t
            lo = 0 if window is None else max(0, pos - window + 1)
            for j in range(h):
                s = k[i, j // g, lo : pos + 1] @ q[i, t, j] / math.sqrt(d)
                p = np.exp(s - s.max())
                out[i, t, j] = p @ v[i, j // g, lo : pos + 1] / p.sum()
    return out


def hand_case():
    """Tokens 0..2 of one sequence in block 2 (the rest of the pool NaN); context 1, two new queries, chunk 3.

    q = 8 e0, sm_scale 1/8: logit_t = K[t, 0] = [0, ln 3, 0]; V[t] = 5 t e1.
    query 0 (position 1) sees {0, 1}: weights [1/4, 3/4] -> 3.75 e1;
    query 1 (position 2) sees {0, 1, 2}: weights [1/5, 3/5, 1/5] -> 5 e1; query slot 2 is padding -> 0.
    """
    d, bs = 64, 8
    k = np.full((3, 1, bs, d), np.nan, np.float32)
    v = np.full((3, 1, bs, d), np.nan, np.float32)
    k[2, 0, :3] = 0.0
    v[2, 0, :3] = 0.0
    k[2, 0, :3, 0] = [0.0, math.log(3.0), 0.0]
    v[2, 0, :3, 1] = [0.0, 5.0, 10.0]
    q = np.zeros((1, 3, 1, d), np.float32)
    q[0, :, 0, 0] = 8.0
    return (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray([[2]], jnp.int32),
            jnp.asarray([1], jnp.int32), jnp.asarray([2], jnp.int32))


@pytest.mark.parametrize("impl", ["ref", "kernel"])
def test_hand_computed(impl):
    fn = paged_prefill_attention_reference if impl == "ref" else paged_prefill_attention
    out = np.asarray(fn(*hand_case(), interpret=INTERPRET))
    tol = 1e-5 if impl == "ref" else 1e-3
    assert out[0, 0, 0, 1] == pytest.approx(3.75, abs=tol)
    assert out[0, 1, 0, 1] == pytest.approx(5.0, abs=tol)
    assert np.all(out[0, 2] == 0)
    assert np.abs(out[0, :, 0, [0] + list(range(2, 64))]).max() < tol


def test_reference_hand_computed_window():
    # W = 2: query 1 (position 2) sees {1, 2}: weights [3/4, 1/4] -> 5 * (3/4 + 2/4) = 6.25; query 0 unchanged.
    out = np.asarray(paged_prefill_attention_reference(*hand_case(), sliding_window=2))
    assert out[0, 0, 0, 1] == pytest.approx(3.75, abs=1e-5)
    assert out[0, 1, 0, 1] == pytest.approx(6.25, abs=1e-5)


@pytest.mark.parametrize("page_dtype", ["float32", "int8", "int4"])
@pytest.mark.parametrize("window", [None, 6])
def test_reference_matches_oracle(page_dtype, window):
    case = make_case(3, batch=3, num_heads=4, kv_heads=2, head_dim=64, block_size=8, lengths=[5, 17, 30],
                     query_lens=[5, 3, 9], chunk=10, page_dtype=page_dtype, q_dtype=jnp.float32)
    out = paged_prefill_attention_reference(case.q, case.k_pages, case.v_pages, case.block_tables, case.lengths,
                                            case.query_lens, sliding_window=window, **case.kwargs())
    assert rel_err(out, oracle(case, window)) < 1e-5


# (page_dtype, heads, kv_heads, head_dim, block_size, total lengths, query lens, chunk, window)
KERNEL_CASES = [
    ("bfloat16", 4, 4, 64, 16, [16, 40, 1], [16, 7, 1], 16, None),  # MHA: a whole first chunk, an append, 1 token
    ("bfloat16", 8, 2, 128, 8, [33, 9], [17, 9], 20, None),  # GQA 4, ragged chunk
    ("float16", 4, 1, 64, 64, [70, 64], [6, 0], 8, None),  # MQA, a row with no queries
    ("float32", 2, 2, 128, 16, [50, 31], [10, 31], 32, None),
    ("bfloat16", 4, 2, 64, 8, [45, 20], [12, 16], 16, 9),  # sliding window
    ("int8", 8, 2, 64, 16, [60, 17], [20, 17], 24, None),
    ("float8_e4m3fn", 4, 4, 128, 32, [40, 5], [8, 5], 8, None),
    ("int4", 4, 4, 64, 16, [16, 40, 1], [16, 7, 1], 16, None),  # MHA
    ("int4", 8, 2, 128, 8, [33, 9], [17, 9], 20, None),  # GQA 4 at head_dim 128
    ("int4", 4, 2, 128, 32, [45, 20], [12, 0], 16, 9),  # sliding window, a row with no queries
    ("int4", 4, 1, 64, 64, [70, 64], [6, 30], 32, None),  # MQA
]


@pytest.mark.parametrize("page_dtype,h,hkv,d,bs,lengths,qlens,chunk,window", KERNEL_CASES)
def test_kernel_matches_reference(page_dtype, h, hkv, d, bs, lengths, qlens, chunk, window):
    case = make_case(sum(lengths) + h + d, batch=len(lengths), num_heads=h, kv_heads=hkv, head_dim=d,
                     block_size=bs, lengths=lengths, query_lens=qlens, chunk=chunk, page_dtype=page_dtype)
    args = (case.q, case.k_pages, case.v_pages, case.block_tables, case.lengths, case.query_lens)
    ref = paged_prefill_attention_reference(*args, sliding_window=window, **case.kwargs())
    out = paged_prefill_attention(*args, sliding_window=window, interpret=INTERPRET, **case.kwargs())
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert rel_err(out, ref) < TOL[page_dtype]
    for b, ql in enumerate(qlens):
        assert np.all(np.asarray(out[b, ql:], np.float32) == 0)
