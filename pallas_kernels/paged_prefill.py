"""Paged prefill / append attention: a chunk of new query tokens against the sequence's paged history and itself.

`paged_prefill_attention` is a Pallas (Triton backend) kernel; `paged_prefill_attention_reference` is the same
function in pure `jnp`, computing in float32. Both take the pool layout of `pallas_kernels.common`.

Query i < query_lens[b] of row b sits at position context_lens[b] + i and attends causally to positions
<= context_lens[b] + i (its own chunk's K/V are already written into the pages), and with a sliding window W only to
positions > context_lens[b] + i - W. Query slots i >= query_lens[b] return zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    LOG2E, check_backend_support, compute_dtype, default_sm_scale, dot_precision, gather_pages_f32, int4_groups,
    page_loader, pool_rows, silence_triton_deprecation, store_chunks, validate_inputs,
)  # fmt: skip
from pallas_kernels.tuning import PREFILL_TUNING as TUNING  # noqa: F401  (kept importable from here)
from pallas_kernels.tuning import prefill_tuned_config as tuned_config

silence_triton_deprecation()


MIN_DOT_ROWS = 16  # Triton dot operands are at least 16 in every dimension: block_q and block_k are >= this


def _prefill_kernel(
    # inputs
    q_ref,  # [BQ, D]             query rows (token-major, then group head), scaled, compute dtype
    k_ref,  # [NB * Hkv * bs, Dp]  the whole K pool, one row per (block, head, slot); Dp = D (D // 2 for int4)
    v_ref,  # [NB * Hkv * bs, Dp]
    *refs,  # [k_scales_ref, v_scales_ref: [NB * Hkv * bs] ([NB * Hkv * bs * G] for int4)], block_tables_ref
    #         [B, M], context_lens_ref [B], query_lens_ref [B]; outputs: o_ref [BQ, D]
    group: int,
    kv_heads: int,
    block_size: int,
    max_blocks: int,
    block_k: int,
    sliding_window: int | None,
    quantized: bool,
    int4: bool,
):
    ks_ref = vs_ref = None
    if quantized:
        ks_ref, vs_ref, bt_ref, ctx_ref, ql_ref, o_ref = refs
    else:
        bt_ref, ctx_ref, ql_ref, o_ref = refs
    b, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_q, d = q_ref.shape
    # The head dim in column chunks with a scale per token each: the whole row, or int4's 32-element scale groups
    # (as in paged_decode: lists of one chunk leave the other page kinds' arithmetic exactly as it was).
    n_chunks = int4_groups(d) if int4 else 1
    cw = d // n_chunks

    ctx, qlen = ctx_ref[b], ql_ref[b]
    tok = (qb * block_q + jnp.arange(block_q, dtype=jnp.int32)) // group  # [BQ] query token of each row
    row_ok = tok < qlen
    qpos = ctx + tok  # [BQ] positions of the queries
    first_tok = (qb * block_q) // group
    last_tok = jnp.minimum((qb * block_q + block_q - 1) // group, qlen - 1)  # last valid query token here
    hi = ctx + last_tok + 1  # keys [lo, hi) cover every valid row of this tile
    lo = 0 if sliding_window is None else jnp.maximum(ctx + first_tok - sliding_window + 1, 0)
    first = lo // block_k
    n_steps = jnp.where(last_tok >= first_tok, pl.cdiv(hi, block_k) - first, 0)

    if n_chunks == 1:
        q = [q_ref[...]]  # [BQ, D]
    else:
        q = [q_ref[:, pl.ds(c * cw, cw)] for c in range(n_chunks)]  # [BQ, cw] each, static column ranges

    load_pages = page_loader(k_ref, v_ref, ks_ref, vs_ref, int4=int4, cdt=q[0].dtype)

    def body(i, carry):
        o, m, l = carry  # chunks [BQ, cw], [BQ], [BQ] float32
        kpos = (first + i) * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [BK]
        k_ok = (kpos >= lo) & (kpos < hi)
        row = pool_rows(bt_ref, b, h, kpos, k_ok, kv_heads=kv_heads, block_size=block_size, max_blocks=max_blocks)
        tile = load_pages(row, k_ok)  # K/V chunks [BK, cw] (zeros outside [lo, hi)), scales [BK] when quantized
        logits = None
        for c in range(n_chunks):
            lc = plgpu.dot(q[c], tile.k[c].astype(q[c].dtype), trans_b=True, precision=dot_precision(q[c].dtype))
            if quantized:
                lc = lc * tile.k_scale[c][None, :]
            logits = lc if logits is None else logits + lc  # [BQ, BK]
        mask = (kpos[None, :] <= qpos[:, None]) & k_ok[None, :] & row_ok[:, None]  # [BQ, BK] causal
        if sliding_window is not None:
            mask &= kpos[None, :] > qpos[:, None] - sliding_window
        logits = jnp.where(mask, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))  # [BQ]; -inf for rows that have seen no key yet
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(logits - m_safe[:, None])  # [BQ, BK]
        l = alpha * l + jnp.sum(p, axis=1)
        o_new = []
        for c in range(n_chunks):
            pc = p * tile.v_scale[c][None, :] if quantized else p
            pv = plgpu.dot(pc.astype(q[c].dtype), tile.v[c].astype(q[c].dtype), precision=dot_precision(q[c].dtype))
            o_new.append(alpha[:, None] * o[c] + pv)  # [BQ, cw]
        return tuple(o_new), m_new, l

    o0 = tuple(jnp.zeros((block_q, cw), jnp.float32) for _ in range(n_chunks))
    m0 = jnp.full((block_q,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((block_q,), jnp.float32)
    o, m, l = jax.lax.fori_loop(0, n_steps, body, (o0, m0, l0))
    den = jnp.where(l > 0, l, 1.0)[:, None]  # padding rows (and rows of empty chunks): zeros
    store_chunks(o_ref, list(o), den)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "block_q", "block_k", "num_warps", "num_stages", "interpret", "debug",
    ),
)  # fmt: skip
def paged_prefill_attention(
    q: jax.Array,  # [B, C, H, D]
    k_pages: jax.Array,  # [num_blocks, Hkv, bs, D] ([..., D // 2] uint8 for packed int4)
    v_pages: jax.Array,  # [num_blocks, Hkv, bs, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32: tokens before the chunk
    query_lens: jax.Array,  # [B] int32: valid queries in the chunk (their K/V already in the pages)
    *,
    k_scales: jax.Array | None = None,  # [num_blocks, Hkv, bs] float16 (int8 / fp8); [..., D // 32] for int4
    v_scales: jax.Array | None = None,
    sm_scale: float | None = None,  # default 1/sqrt(D)
    sliding_window: int | None = None,
    block_q: int | None = None,  # query rows (token x group head) per program, power of two >= 16
    block_k: int | None = None,  # key tokens per loop step, power of two >= 16
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:  # [B, C, H, D] in q's dtype
    """Causal attention of a chunk of new tokens over the paged K/V pools (Pallas, Triton backend).

    Grid (batch, kv_head, query block): a program holds `block_q` (token, group head) query rows of one KV head,
    so GQA/MQA read each K/V tile once for the whole group, and streams only the keys its rows can see.
    int8/fp8/int4 pages are dequantized in the kernel (int4: unpacked per 32-element scale group, see `common`).
    """
    s = validate_inputs(
        q, k_pages, v_pages, block_tables, context_lens, query_lens,
        k_scales=k_scales, v_scales=v_scales, sm_scale=sm_scale, sliding_window=sliding_window, prefill=True,
    )  # fmt: skip
    check_backend_support(s.page_dtype, interpret)
    bq_def, bk_def, w_def, st_def = tuned_config(s.page_dtype, s.head_dim)
    block_q, block_k = block_q or bq_def, block_k or bk_def
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if val < MIN_DOT_ROWS or val & (val - 1):
            raise ValueError(f"{name}={val} must be a power of two >= {MIN_DOT_ROWS} (a Triton dot operand size).")
    batch, chunk, num_heads, d = q.shape
    kv_heads, group, block_size = s.kv_heads, s.group, s.block_size
    rows = chunk * group
    # Don't make a block much taller than the work: a power of two >= 16 covering the rows.
    block_q = min(block_q, max(MIN_DOT_ROWS, pl.next_power_of_2(rows)))
    n_qblocks = pl.cdiv(rows, block_q)
    cdt = compute_dtype(q.dtype, s.page_dtype)
    scale = default_sm_scale(d, sm_scale)

    # q: [B, C, H, D] -> [B, Hkv, C*G, D] (row = token * G + group head), scaled into the log2 domain.
    qr = (q.astype(jnp.float32) * (scale * LOG2E)).reshape(batch, chunk, kv_heads, group, d)
    qr = qr.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, rows, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, n_qblocks * block_q - rows), (0, 0))).astype(cdt)
    pool_rows = s.num_blocks * kv_heads * block_size
    dp = k_pages.shape[-1]  # d, or d // 2 for packed int4
    whole = lambda shape: pl.BlockSpec(shape, lambda b, h, i: (0,) * len(shape))  # noqa: E731
    inputs = [qr, k_pages.reshape(pool_rows, dp), v_pages.reshape(pool_rows, dp)]
    in_specs = [
        pl.BlockSpec((None, None, block_q, d), lambda b, h, i: (b, h, i, 0)),
        whole((pool_rows, dp)),
        whole((pool_rows, dp)),
    ]
    if s.quantized:
        n_scales = pool_rows * (int4_groups(d) if s.int4 else 1)  # int4: G group scales per row, row-major
        inputs += [k_scales.reshape(n_scales), v_scales.reshape(n_scales)]
        in_specs += [whole((n_scales,)), whole((n_scales,))]
    inputs += [block_tables, context_lens, query_lens]
    in_specs += [whole(block_tables.shape), whole(context_lens.shape), whole(query_lens.shape)]

    kernel = functools.partial(
        _prefill_kernel,
        group=group,
        kv_heads=kv_heads,
        block_size=block_size,
        max_blocks=s.max_blocks,
        block_k=block_k,
        sliding_window=sliding_window,
        quantized=s.quantized,
        int4=s.int4,
    )
    out = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, n_qblocks),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, block_q, d), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, n_qblocks * block_q, d), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or w_def, num_stages=num_stages or st_def),
        interpret=interpret,
        debug=debug,
        name=f"jkv_paged_prefill_Q{block_q}_K{block_k}",
    )(*inputs)
    out = out[:, :, :rows].reshape(batch, kv_heads, chunk, group, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, chunk, num_heads, d)  # [B, C, H, D]


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "block_q", "block_k", "num_warps", "num_stages", "interpret",
    ),
)  # fmt: skip
def paged_prefill_attention_reference(
    q: jax.Array,  # [B, C, H, D]
    k_pages: jax.Array,  # [num_blocks, Hkv, bs, D]
    v_pages: jax.Array,  # [num_blocks, Hkv, bs, D]
    block_tables: jax.Array,  # [B, M] int32
    context_lens: jax.Array,  # [B] int32: tokens before the chunk
    query_lens: jax.Array,  # [B] int32: valid queries in the chunk
    *,
    k_scales: jax.Array | None = None,  # [num_blocks, Hkv, bs] (quantized pages)
    v_scales: jax.Array | None = None,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    block_q: int | None = None,  # kernel tuning knobs: accepted and ignored
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, C, H, D] in q's dtype
    """Causal chunk attention over paged K/V in float32 (gathers each sequence's pages into a dense tensor)."""
    del block_q, block_k, num_warps, num_stages, interpret
    s = validate_inputs(
        q, k_pages, v_pages, block_tables, context_lens, query_lens,
        k_scales=k_scales, v_scales=v_scales, sm_scale=sm_scale, sliding_window=sliding_window, prefill=True,
        kernel=False,
    )  # fmt: skip
    scale = default_sm_scale(s.head_dim, sm_scale)
    k = gather_pages_f32(k_pages, k_scales, block_tables)  # [B, Hkv, T, D]
    v = gather_pages_f32(v_pages, v_scales, block_tables)  # [B, Hkv, T, D]
    kpos = jnp.arange(s.max_tokens)  # [T]
    qi = jnp.arange(s.query_len)  # [C]
    qpos = context_lens[:, None] + qi[None, :]  # [B, C]
    q_valid = qi[None, :] < query_lens[:, None]  # [B, C]
    valid = (kpos[None, None, :] <= qpos[:, :, None]) & q_valid[:, :, None]  # [B, C, T]
    if sliding_window is not None:
        valid &= kpos[None, None, :] > qpos[:, :, None] - sliding_window
    # Keys any query of the row may see; the rest are zeroed so NaN garbage cannot leak through 0 * NaN.
    seen = jnp.any(valid, axis=1)  # [B, T]
    k = jnp.where(seen[:, None, :, None], k, 0.0)
    v = jnp.where(seen[:, None, :, None], v, 0.0)
    qg = q.astype(jnp.float32).reshape(s.batch, s.query_len, s.kv_heads, s.group, s.head_dim)  # [B, C, Hkv, G, D]
    logits = jnp.einsum("bckgd,bktd->bkgct", qg, k, precision="highest") * scale  # [B, Hkv, G, C, T]
    mask = valid[:, None, None, :, :]  # [B, 1, 1, C, T]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)  # invalid query rows -> zero weights -> zero output
    out = jnp.einsum("bkgct,bktd->bckgd", p, v, precision="highest")  # [B, C, Hkv, G, D]
    return out.reshape(s.batch, s.query_len, s.num_heads, s.head_dim).astype(q.dtype)
