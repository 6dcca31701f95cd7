"""Paged decode attention: the jnp reference on hand-computed cases and against a float64 oracle, then the Pallas
kernel against the reference (interpret=True on CPU; JKV_TEST_GPU=1 runs the compiled kernel on a GPU), for every
page kind: bf16/f16/f32, int8/fp8 and packed int4."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.testing import INTERPRET, TOL, dense_from_case, make_case, rel_err

def oracle(case, sm_scale=None, window=None):
    """Decode attention in float64 NumPy from the dense (poisoned) K/V, masking before any arithmetic."""
    k, v = dense_from_case(case)  # [B, Hkv, T, D]
    q = np.asarray(case.q.astype(jnp.float32), np.float64)
    b, h, d = q.shape
    hkv = k.shape[1]
    scale = 1 / math.sqrt(d) if sm_scale is None else sm_scale
    out = np.zeros((b, h, d))
    for i in range(b):
        n = int(case.lengths[i])
        lo = 0 if window is None else max(0, n - window)
        if n == 0:
            continue
        for j in range(h):
            kk, vv = k[i, j // (h // hkv), lo:n], v[i, j // (h // hkv), lo:n]
            s = kk @ q[i, j] * scale
            p = np.exp(s - s.max())
            out[i, j] = p @ vv / p.sum()
    return out


# --- reference: hand-computed ---------------------------------------------------------------------------------


def hand_case(page_dtype=jnp.float32):
    """One sequence of 3 tokens in block 2 of a 3-block pool (blocks 0, 1 and slots 3.. of block 2 are NaN).

    q = 8 e0 and sm_scale = 1/8 (head_dim 64), so logit_t = K[t, 0] = [0, ln 3, 0] -> weights [1/5, 3/5, 1/5];
    V[t] = 5 t e1 -> out = 5 * (0/5 + 3/5 + 2/5) e1 = 5 e1.
    """
    d, bs = 64, 8
    k = np.full((3, 1, bs, d), np.nan, np.float32)
    v = np.full((3, 1, bs, d), np.nan, np.float32)
    k[2, 0, :3] = 0.0
    v[2, 0, :3] = 0.0
    k[2, 0, :3, 0] = [0.0, math.log(3.0), 0.0]
    v[2, 0, :3, 1] = [0.0, 5.0, 10.0]
    q = np.zeros((1, 1, d), np.float32)
    q[0, 0, 0] = 8.0
    return (jnp.asarray(q), jnp.asarray(k, page_dtype), jnp.asarray(v, page_dtype),
            jnp.asarray([[2]], jnp.int32), jnp.asarray([3], jnp.int32))


def test_reference_hand_computed():
    out = np.asarray(paged_decode_attention_reference(*hand_case()))
    expect = np.zeros(64)
    expect[1] = 5.0
    np.testing.assert_allclose(out[0, 0], expect, atol=1e-5)


def test_reference_hand_computed_sliding_window():
    # W = 2: positions >= 3 - 2 = 1 -> weights softmax([ln 3, 0]) = [3/4, 1/4] -> 5 * (3/4 + 2/4) = 6.25
    out = np.asarray(paged_decode_attention_reference(*hand_case(), sliding_window=2))
    assert out[0, 0, 1] == pytest.approx(6.25, abs=1e-5)
    assert np.abs(np.delete(out[0, 0], 1)).max() < 1e-6


def test_reference_hand_computed_gqa_and_zero_length():
    # Two query heads share the KV head; head 1 has q = 0 -> uniform weights -> 5 * (0 + 1 + 2) / 3 = 5.
    # A second row with length 0 returns zeros.
    q, k, v, _, _ = hand_case()
    q2 = jnp.zeros((2, 2, 64), jnp.float32).at[0, 0].set(q[0, 0]).at[1].set(7.0)
    out = np.asarray(paged_decode_attention_reference(
        q2, k, v, jnp.asarray([[2], [0]], jnp.int32), jnp.asarray([3, 0], jnp.int32)))
    assert out[0, 0, 1] == pytest.approx(5.0, abs=1e-5)
    assert out[0, 1, 1] == pytest.approx(5.0, abs=1e-5)
    assert np.all(out[1] == 0)


def test_reference_sm_scale_and_dtype():
    # sm_scale 0 -> uniform weights over the 3 tokens -> 5 e1 as well; output keeps q's dtype.
    q, k, v, bt, ln = hand_case()
    out = paged_decode_attention_reference(q.astype(jnp.bfloat16), k, v, bt, ln, sm_scale=0.0)
    assert out.dtype == jnp.bfloat16
    assert float(out[0, 0, 1]) == pytest.approx(5.0, abs=1e-2)


# --- reference: against the float64 oracle on random poisoned pools -------------------------------------------


@pytest.mark.parametrize("page_dtype", ["float32", "bfloat16", "int8", "float8_e4m3fn", "int4"])
@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_oracle(page_dtype, window):
    case = make_case(1, batch=4, num_heads=4, kv_heads=2, head_dim=64, block_size=8, lengths=[1, 9, 16, 23],
                     page_dtype=page_dtype, q_dtype=jnp.float32)
    out = paged_decode_attention_reference(case.q, case.k_pages, case.v_pages, case.block_tables, case.lengths,
                                           sliding_window=window, **case.kwargs())
    assert rel_err(out, oracle(case, window=window)) < 1e-5


# --- kernel against the reference ------------------------------------------------------------------------------

# (page_dtype, heads, kv_heads, head_dim, block_size, lengths-kind, window): a sample of the full product,
# chosen so that every value of every axis appears and MHA/GQA/MQA each meet both head dims.
KERNEL_CASES = [
    ("bfloat16", 4, 4, 64, 16, "edges", None),  # MHA
    ("bfloat16", 8, 2, 128, 8, "edges", None),  # GQA 4
    ("float16", 4, 1, 64, 64, "edges", None),  # MQA
    ("float32", 2, 2, 128, 16, "random", None),
    ("bfloat16", 16, 2, 64, 16, "long", None),  # GQA 8, several context splits
    ("bfloat16", 4, 2, 64, 8, "random", 7),  # sliding window
    ("float16", 2, 1, 128, 64, "long", 100),
    ("int8", 4, 4, 64, 16, "edges", None),
    ("int8", 8, 2, 128, 16, "long", None),
    ("float8_e4m3fn", 4, 1, 64, 8, "random", None),
    ("int8", 4, 2, 64, 32, "random", 20),
    ("int4", 4, 4, 64, 16, "edges", None),  # MHA (lane path), an empty row
    ("int4", 8, 2, 128, 8, "edges", None),  # GQA 4 (dots), an empty row
    ("int4", 2, 2, 128, 32, "random", 11),  # MHA at head_dim 128, sliding window
    ("int4", 8, 2, 128, 16, "random", 20),  # GQA at head_dim 128, sliding window
    ("int4", 4, 1, 64, 64, "long", 100),  # MQA, several context splits, window
]


def lengths_for(kind, bs, rng):
    if kind == "edges":  # 1, block - 1, block, block + 1, maximum (4 blocks), and an empty row
        return [1, bs - 1, bs, bs + 1, 4 * bs, 0], 4
    if kind == "long":
        return [300, 1, 517], -(-520 // bs)
    return list(rng.integers(1, 6 * bs, size=3)), 6


@pytest.mark.parametrize("page_dtype,h,hkv,d,bs,kind,window", KERNEL_CASES)
def test_kernel_matches_reference(page_dtype, h, hkv, d, bs, kind, window):
    rng = np.random.default_rng(hash((page_dtype, h, hkv, d, bs, kind)) % 2**32)
    lengths, max_blocks = lengths_for(kind, bs, rng)
    case = make_case(int(rng.integers(1 << 30)), batch=len(lengths), num_heads=h, kv_heads=hkv, head_dim=d,
                     block_size=bs, lengths=lengths, max_blocks=max_blocks, page_dtype=page_dtype)
    args = (case.q, case.k_pages, case.v_pages, case.block_tables, case.lengths)
    ref = paged_decode_attention_reference(*args, sliding_window=window, **case.kwargs())
    out = paged_decode_attention(*args, sliding_window=window, interpret=INTERPRET, **case.kwargs())
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert rel_err(out, ref) < TOL[page_dtype]
    for b, n in enumerate(lengths):
        if n == 0:
            assert np.all(np.asarray(out[b], np.float32) == 0)


@pytest.mark.parametrize("page_dtype", ["bfloat16", "int4"])
@pytest.mark.parametrize("tokens_per_step,num_splits", [(16, 1), (32, 3), (64, 2)])
def test_kernel_block_sizes(tokens_per_step, num_splits, page_dtype):
    """Explicit tuning knobs (tile widths below, at and above the block size; 1 to 3 context splits)."""
    case = make_case(7, batch=3, num_heads=4, kv_heads=2, head_dim=64, block_size=16, lengths=[33, 1, 96],
                     page_dtype=page_dtype)
    args = (case.q, case.k_pages, case.v_pages, case.block_tables, case.lengths)
    ref = paged_decode_attention_reference(*args, **case.kwargs())
    out = paged_decode_attention(*args, tokens_per_step=tokens_per_step, num_splits=num_splits,
                                 interpret=INTERPRET, **case.kwargs())
    assert rel_err(out, ref) < TOL[page_dtype]


def test_kernel_hand_computed():
    q, k, v, bt, ln = hand_case(jnp.float32)
    out = np.asarray(paged_decode_attention(q, k, v, bt, ln, interpret=INTERPRET))
    assert out[0, 0, 1] == pytest.approx(5.0, abs=1e-3)
    assert np.abs(np.delete(out[0, 0], 1)).max() < 1e-3


@pytest.mark.parametrize("page_dtype,d", [("bfloat16", 64), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("use_dot", [False, True])
def test_kernel_mha_paths(use_dot, page_dtype, d):
    """MHA runs either the dot-free lane path or the padded tensor-core path (the tuning table picks one)."""
    from pallas_kernels.paged_decode import _decode_pallas_call

    case = make_case(11, batch=3, num_heads=2, kv_heads=2, head_dim=d, block_size=16, lengths=[70, 1, 16],
                     max_blocks=5, page_dtype=page_dtype)
    args = (case.q, case.k_pages, case.v_pages, case.block_tables, case.lengths)
    ref = paged_decode_attention_reference(*args, **case.kwargs())
    out = _decode_pallas_call(*args, case.k_scales, case.v_scales, scale=1 / math.sqrt(d), sliding_window=None,
                              tokens_per_step=32, num_splits=2, num_warps=4, num_stages=2, interpret=INTERPRET,
                              debug=False, use_dot=use_dot)
    assert rel_err(out, ref) < TOL[page_dtype]
