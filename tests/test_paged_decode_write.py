"""`paged_decode_attention_write`: the decode kernel that also stores the current token's K/V into the pools.

Checked against an independent expectation: the pools with the new rows set by NumPy, then the plain decode
reference over those pools. The current token's slot is poisoned (NaN) before the call, so a kernel that read
the slot from the pool instead of using the new K/V it was given would return NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode import (
    paged_decode_attention_reference, paged_decode_attention_write, paged_decode_attention_write_reference,
)  # fmt: skip
from pallas_kernels.testing import INTERPRET, TOL, make_case, rel_err

CASES = [
    # page dtype, qkv dtype, H, Hkv, D, block size, lengths, window, num_splits (None: the kernel's choice)
    ("bfloat16", "bfloat16", 4, 4, 64, 16, [1, 15, 16, 17, 64, 0], None, None),  # MHA (GPT-2), block edges
    ("bfloat16", "bfloat16", 4, 4, 64, 8, [300, 1, 517], None, 3),  # several context splits
    ("float32", "float32", 8, 2, 128, 16, [40, 7, 0, 33], 24, None),  # GQA, sliding window
    ("float16", "float16", 4, 1, 64, 32, [100, 65], None, 2),  # MQA
    ("bfloat16", "float32", 4, 4, 64, 16, [23, 48], None, None),  # float32 model over a bf16 pool
    ("bfloat16", "bfloat16", 4, 4, 64, 16, [1, 5, 40, 100], 1, None),  # window 1: the new token alone
    ("float32", "float32", 4, 2, 64, 8, [129, 70, 200], 20, 2),  # window edge inside a tile, two splits
]


def expected(case, qkv, h, hkv):
    """(pools with row b's new K/V at position lengths[b] - 1, set in NumPy; q)."""
    k = np.array(case.k_pages.astype(jnp.float32))
    v = np.array(case.v_pages.astype(jnp.float32))
    new = np.asarray(qkv.astype(case.k_pages.dtype).astype(jnp.float32))
    tables, lengths = np.asarray(case.block_tables), np.asarray(case.lengths)
    bs = k.shape[2]
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        blk, off = tables[b, (n - 1) // bs], (n - 1) % bs
        k[blk, :, off] = new[b, h : h + hkv]
        v[blk, :, off] = new[b, h + hkv :]
    dt = case.k_pages.dtype
    return jnp.asarray(k, dt), jnp.asarray(v, dt)


@pytest.mark.parametrize("page_dtype,qkv_dtype,h,hkv,d,bs,lengths,window,num_splits", CASES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_write_and_attend(impl, page_dtype, qkv_dtype, h, hkv, d, bs, lengths, window, num_splits):
    case = make_case(sum(lengths) + h + d, batch=len(lengths), num_heads=h, kv_heads=hkv, head_dim=d, block_size=bs,
                     lengths=lengths, page_dtype=page_dtype)  # fmt: skip
    rng = np.random.default_rng(len(lengths))
    qkv = jnp.asarray(rng.standard_normal((len(lengths), h + 2 * hkv, d)), qkv_dtype)
    tables, bsz = np.asarray(case.block_tables), bs
    k_pool, v_pool = np.array(case.k_pages.astype(jnp.float32)), np.array(case.v_pages.astype(jnp.float32))
    for b, n in enumerate(lengths):  # poison the slots about to be written
        if n:
            k_pool[tables[b, (n - 1) // bsz], :, (n - 1) % bsz] = np.nan
            v_pool[tables[b, (n - 1) // bsz], :, (n - 1) % bsz] = np.nan
    case.k_pages, case.v_pages = jnp.asarray(k_pool, page_dtype), jnp.asarray(v_pool, page_dtype)
    want_k, want_v = expected(case, qkv, h, hkv)
    want = paged_decode_attention_reference(qkv[:, :h], want_k, want_v, case.block_tables, case.lengths,
                                            sliding_window=window)  # fmt: skip

    args = (qkv, case.k_pages, case.v_pages, case.block_tables, case.lengths)
    if impl == "kernel":
        out, k_new, v_new = paged_decode_attention_write(*args, num_heads=h, sliding_window=window,
                                                         num_splits=num_splits, interpret=INTERPRET)  # fmt: skip
    else:
        out, k_new, v_new = paged_decode_attention_write_reference(*args, num_heads=h, sliding_window=window)
    assert out.shape == (len(lengths), h, d) and out.dtype == qkv.dtype
    assert k_new.shape == case.k_pages.shape and k_new.dtype == case.k_pages.dtype
    assert rel_err(out, want) < TOL[page_dtype]
    # every block but the null block 0 (rows of length 0 may write there) equals the expectation, NaNs included
    for got, exp in ((k_new, want_k), (v_new, want_v)):
        np.testing.assert_array_equal(np.asarray(got[1:].astype(jnp.float32)), np.asarray(exp[1:].astype(jnp.float32)))
    for b, n in enumerate(lengths):
        if n == 0:
            assert np.all(np.asarray(out[b], np.float32) == 0)


def test_write_in_place_when_donated():
    """Inside a jit that donates the pools, the returned pools are the donated buffers (aliased, not new ones).

    (Interpret mode still copies blocks into temporaries; on an H200 the engine's compiled decode step held no
    copy of a pool: `scripts/profile_step.py` counts them in the optimized HLO.)
    """
    case = make_case(3, batch=2, num_heads=4, kv_heads=4, head_dim=64, block_size=16, lengths=[5, 20],
                     extra_blocks=40)  # fmt: skip
    qkv = jnp.ones((2, 12, 64), jnp.bfloat16)

    def step(k, v, qkv, bt, ln):
        return paged_decode_attention_write(qkv, k, v, bt, ln, num_heads=4, interpret=INTERPRET)

    fn = jax.jit(step, donate_argnums=(0, 1))
    compiled = fn.lower(case.k_pages, case.v_pages, qkv, case.block_tables, case.lengths).compile()
    assert compiled.memory_analysis().alias_size_in_bytes >= case.k_pages.nbytes + case.v_pages.nbytes
    out, k, v = fn(case.k_pages, case.v_pages, qkv, case.block_tables, case.lengths)
    assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("qkv_heads,page_dtype,match", [
    (11, "bfloat16", "query heads"),
    (12, "int8", "float pages"),
])  # fmt: skip
def test_write_rejects_bad_inputs(qkv_heads, page_dtype, match):
    case = make_case(1, batch=2, num_heads=4, kv_heads=4, head_dim=64, block_size=16, lengths=[5, 20],
                     page_dtype=page_dtype)  # fmt: skip
    qkv = jnp.ones((2, qkv_heads, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_write(qkv, case.k_pages, case.v_pages, case.block_tables, case.lengths, num_heads=4,
                                     interpret=True)  # fmt: skip
