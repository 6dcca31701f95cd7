"""Paged decode attention: one new query token per sequence against its K/V in the block pools.

`paged_decode_attention` is a Pallas (Triton backend) kernel; `paged_decode_attention_reference` is the same
function in pure `jnp`, computing in float32. Both take the pool layout of `pallas_kernels.common`.

lengths[b] counts the tokens already in the pages INCLUDING the current one (the engine writes the new K/V first),
so the query sits at position lengths[b] - 1 and attends to positions [max(0, lengths[b] - W), lengths[b]).
A row with length 0 returns zeros.

The kernel body is a composition of small pieces: a query load, a page loader per page kind (`common.page_loader`),
one loop body per path (`_dot_step` for grouped heads and the padded MHA path, `_lane_step` for the dot-free MHA
path), the current token's write and fold for `paged_decode_attention_write`, and an epilogue that normalizes and
writes the output (or this split's partial and its log-sum-exp).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    FLOAT_PAGE_DTYPES, INT4_PAGE_DTYPE, LOG2E, PageTile, check_backend_support, compute_dtype, default_sm_scale,
    dot_precision, gather_pages_f32, int4_groups, page_loader, pool_rows, silence_triton_deprecation, store_chunks,
    validate_inputs,
)  # fmt: skip
from pallas_kernels.tuning import DECODE_TUNING as TUNING  # noqa: F401  (kept importable from here)
from pallas_kernels.tuning import choose_splits, choose_step
from pallas_kernels.tuning import decode_tuned_config as tuned_config

silence_triton_deprecation()


MIN_DOT_ROWS = 16  # Triton dot operands are at least 16 in every dimension: query groups are padded to this


# --------------------------------------------------------------------------------------------------------------
# Kernel pieces
# --------------------------------------------------------------------------------------------------------------

Carry = tuple[Sequence[jax.Array], jax.Array, jax.Array]  # (output chunks, running max, running sum), float32
StepLoader = Callable[[jax.Array], tuple[jax.Array, PageTile]]  # step i -> (valid [T], its K/V tile)


def _load_queries(q_ref, b, h, *, group: int, gp: int, n_chunks: int, q_scale: float) -> list[jax.Array]:
    """This KV head's query heads as float32 column chunks [Gp, cw], scaled into the log2 domain.

    q_scale is sm_scale * log2 e, so the softmax runs on exp2. Rows >= group are zero padding (the dot path's tile
    has Gp >= 16 rows; the lane path has Gp = 1).
    """
    cw = q_ref.shape[-1] // n_chunks
    gi = jnp.arange(gp, dtype=jnp.int32)
    head_ok = jnp.broadcast_to((gi < group)[:, None], (gp, cw))
    q = []
    for c in range(n_chunks):
        di = jnp.arange(c * cw, (c + 1) * cw, dtype=jnp.int32)
        head_idx = (b, h * group + jnp.minimum(gi, group - 1)[:, None], di[None, :])  # [Gp, cw] of q / out
        q.append(plgpu.load(q_ref.at[head_idx], mask=head_ok, other=0).astype(jnp.float32) * q_scale)
    return q


def _store_new_token(
    q_ref, k_out_ref, v_out_ref, bt_ref, b, h, s, length, *, num_heads: int, kv_heads: int, block_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Store this KV head's new key and value into the current token's slot; return them [D] and its position.

    q_ref is the projection's whole output [B, H + 2 Hkv, D]: the new key and value are rows H + h and H + Hkv + h,
    cast to the page dtype as a scatter would. Only split 0 stores, and a row of length 0 stores nothing.
    """
    d = q_ref.shape[-1]
    cols = jnp.arange(d, dtype=jnp.int32)
    k_new = plgpu.load(q_ref.at[(b, num_heads + h, cols)]).astype(k_out_ref.dtype)  # [D]
    v_new = plgpu.load(q_ref.at[(b, num_heads + kv_heads + h, cols)]).astype(v_out_ref.dtype)  # [D]
    cur = jnp.maximum(length - 1, 0)
    cur_page = bt_ref[b, cur // block_size]
    cur_row = (cur_page * kv_heads + h) * block_size + cur % block_size
    store_ok = jnp.broadcast_to((s == 0) & (length > 0), (d,))
    plgpu.store(k_out_ref.at[(cur_row, cols)], k_new, mask=store_ok)
    plgpu.store(v_out_ref.at[(cur_row, cols)], v_new, mask=store_ok)
    return k_new, v_new, cur


def _dot_step(carry: Carry, q: list[jax.Array], tile: PageTile, valid: jax.Array, cdt: jnp.dtype) -> Carry:
    """One online-softmax update of all query rows of the KV head over T tokens: QK and PV as tensor-core dots.

    carry: output chunks [Gp, cw], running max [Gp] and sum [Gp]; q: chunks [Gp, cw] in the compute dtype. Logits
    sum over the chunks; each chunk keeps its own output columns. K scales multiply the logits of their token and
    V scales its softmax weight, so the dots never see a scaled tile.
    """
    o, m, l = carry
    logits = None
    for c, qc in enumerate(q):
        lc = plgpu.dot(qc, tile.k[c].astype(cdt), trans_b=True, precision=dot_precision(cdt))  # [Gp, T]
        if tile.k_scale is not None:
            lc = lc * tile.k_scale[c][None, :]
        logits = lc if logits is None else logits + lc
    logits = jnp.where(valid[None, :], logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))  # [Gp], finite: the step holds a valid token
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(logits - m_new[:, None])  # [Gp, T]
    l = alpha * l + jnp.sum(p, axis=1)
    o_new = []
    for c in range(len(q)):
        pc = p * tile.v_scale[c][None, :] if tile.v_scale is not None else p
        pv = plgpu.dot(pc.astype(cdt), tile.v[c].astype(cdt), precision=dot_precision(cdt))  # [Gp, cw]
        o_new.append(alpha[:, None] * o[c] + pv)
    return tuple(o_new), m_new, l


def _dot_loop(q: list[jax.Array], load_step: StepLoader, n_steps: jax.Array, cdt: jnp.dtype) -> Carry:
    """All query heads of the KV head in one [Gp, D] tile, two dots per step and chunk; returns o, m, l [Gp]."""
    qd = [qc.astype(cdt) for qc in q]  # [Gp, cw] each
    gp, cw = q[0].shape

    def body(i, carry):
        valid, tile = load_step(i)
        return _dot_step(carry, qd, tile, valid, cdt)

    o0 = tuple(jnp.zeros((gp, cw), jnp.float32) for _ in q)
    m0 = jnp.full((gp,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((gp,), jnp.float32)
    return jax.lax.fori_loop(0, n_steps, body, (o0, m0, l0))


def _lane_step(carry: Carry, q: list[jax.Array], tile: PageTile, valid: jax.Array) -> Carry:
    """One online-softmax update per token lane (MHA, no dot): elementwise work and a reduction over D.

    carry: accumulator chunks [T, cw], running max [T] and sum [T], one softmax per lane; q: float32 chunks [1, cw].
    """
    acc, m, l = carry
    logits = None
    for c, qc in enumerate(q):
        lc = jnp.sum(tile.k[c].astype(jnp.float32) * qc, axis=1)  # [T]
        if tile.k_scale is not None:
            lc = lc * tile.k_scale[c]
        logits = lc if logits is None else logits + lc
    logits = jnp.where(valid, logits, -jnp.inf)
    m_new = jnp.maximum(m, logits)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a lane may have seen no token yet
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(logits - m_safe)  # [T]
    l = alpha * l + p
    acc_new = []
    for c in range(len(q)):
        pc = p * tile.v_scale[c] if tile.v_scale is not None else p
        acc_new.append(alpha[:, None] * acc[c] + pc[:, None] * tile.v[c].astype(jnp.float32))
    return tuple(acc_new), m_new, l


def _merge_lanes(acc: tuple[jax.Array, ...], m_lane: jax.Array, l_lane: jax.Array) -> Carry:
    """The T lanes' softmaxes as one: output chunks [1, cw], max [1], sum [1]. Lanes that saw nothing weigh 0."""
    m_top = jnp.max(m_lane)
    m_top = jnp.where(m_top == -jnp.inf, 0.0, m_top)
    w = jnp.exp2(m_lane - m_top)  # [T]; lanes that saw nothing -> 0
    o = [jnp.sum(w[:, None] * a, axis=0)[None, :] for a in acc]  # chunks [1, cw]
    l = jnp.sum(w * l_lane)[None]  # [1]
    m = jnp.full((1,), m_top, jnp.float32)
    return o, m, l


def _lane_loop(q: list[jax.Array], load_step: StepLoader, n_steps: jax.Array, t_step: int) -> Carry:
    """One query head (MHA): each of the T token lanes keeps its own running max, sum and [D] accumulator; lanes
    merge once at the end. Returns o chunks [1, cw], m [1], l [1]."""
    cw = q[0].shape[-1]

    def body(i, carry):
        valid, tile = load_step(i)
        return _lane_step(carry, q, tile, valid)

    acc0 = tuple(jnp.zeros((t_step, cw), jnp.float32) for _ in q)
    m0 = jnp.full((t_step,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((t_step,), jnp.float32)
    return _merge_lanes(*jax.lax.fori_loop(0, n_steps, body, (acc0, m0, l0)))


def _fold_new_token(o, m, l, q: list[jax.Array], k_new: jax.Array, v_new: jax.Array, holds_new: jax.Array) -> Carry:
    """One more online-softmax update with the current token's key and value, from registers; a no-op unless this
    program's range holds the token. Float pages only: one chunk, q[0] float32 [Gp, D]."""
    logit = jnp.sum(q[0] * k_new.astype(jnp.float32)[None, :], axis=1)  # [Gp]
    m_upd = jnp.maximum(m, logit)
    alpha = jnp.exp2(m - m_upd)
    p = jnp.exp2(logit - m_upd)
    o = [jnp.where(holds_new, alpha[:, None] * o[0] + p[:, None] * v_new.astype(jnp.float32)[None, :], o[0])]
    l = jnp.where(holds_new, alpha * l + p, l)
    m = jnp.where(holds_new, m_upd, m)
    return o, m, l


def _write_outputs(o_ref, lse_ref, o, m: jax.Array, l: jax.Array) -> None:
    """Epilogue: o / l into o_ref [Gp, D] and, for a context split, its log-sum-exp (log2 domain) into lse_ref [Gp].

    An empty range (length 0, or a split past the end) writes zeros and an lse of -inf (weight 0 in the merge).
    """
    has = l > 0
    den = jnp.where(has, l, 1.0)[:, None]
    store_chunks(o_ref, o, den)
    if lse_ref is not None:
        lse_ref[...] = jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), -jnp.inf)


def _decode_kernel(
    # inputs
    q_ref,  # [B, H, D]           queries, unscaled, in q's dtype
    k_ref,  # [NB * Hkv * bs, Dp] the whole K pool, one row per (block, head, slot); Dp = D (D // 2 for int4)
    v_ref,  # [NB * Hkv * bs, Dp]
    *refs,  # [k_scales_ref, v_scales_ref: [NB * Hkv * bs] ([NB * Hkv * bs * G] for int4)], block_tables_ref [B, M],
    # lengths_ref [B]; outputs: o_ref [Gp, D] (the result, or this split's partial), [lse_ref [Gp]] (split partials)
    group: int,
    kv_heads: int,
    block_size: int,
    max_blocks: int,
    tokens_per_step: int,
    split_tokens: int,
    sliding_window: int | None,
    quantized: bool,
    int4: bool,
    use_dot: bool,
    split: bool,
    gp: int,
    q_scale: float,
    cdt: jnp.dtype,
    num_heads: int,
    write_new: bool,
):
    ks_ref = vs_ref = None
    if quantized:
        ks_ref, vs_ref, bt_ref, len_ref, *out_refs = refs
    else:
        bt_ref, len_ref, *out_refs = refs
    if write_new:  # the pools again, aliased to k_ref / v_ref: only the current token's row is stored
        *out_refs, k_out_ref, v_out_ref = out_refs
    o_ref, lse_ref = out_refs[0], (out_refs[1] if split else None)
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t_step = tokens_per_step
    # The head dim in column chunks, each with its own scale per token: one chunk (the whole row) for float, int8
    # and fp8 pages; the 32-element scale groups for int4 pages (lists of one chunk leave the other page kinds'
    # arithmetic exactly as it was before int4).
    n_chunks = int4_groups(q_ref.shape[-1]) if int4 else 1
    q = _load_queries(q_ref, b, h, group=group, gp=gp, n_chunks=n_chunks, q_scale=q_scale)  # float32 [Gp, cw] each

    length = len_ref[b]
    lo = 0 if sliding_window is None else jnp.maximum(length - sliding_window, 0)
    if write_new:
        # Split 0 stores the new key and value into position length - 1; the token loop stops before that position,
        # and the split that covers it folds them into its softmax from registers after the loop, so no program
        # reads a row that a program writes.
        k_new, v_new, cur = _store_new_token(q_ref, k_out_ref, v_out_ref, bt_ref, b, h, s, length,
                                             num_heads=num_heads, kv_heads=kv_heads, block_size=block_size)  # fmt: skip
    start = jnp.maximum(lo, s * split_tokens)  # this program's token range [start, end)
    end = jnp.minimum(length, (s + 1) * split_tokens)
    holds_new = False
    if write_new:  # the loop covers [start, loop_end); the current token comes after it
        holds_new = (length > 0) & (start <= cur) & (cur < end)
        end = jnp.minimum(end, cur)
    first = start // t_step
    # every step holds >= 1 token of [start, end); an empty range runs none (the online softmax needs a token)
    n_steps = jnp.where(end > start, jnp.maximum(pl.cdiv(end, t_step) - first, 0), 0)
    load_pages = page_loader(k_ref, v_ref, ks_ref, vs_ref, int4=int4, cdt=cdt)

    def load_step(i):
        """Step i's tokens: which are in [start, end), and their K/V (zeros outside) with dequantization scales."""
        pos = (first + i) * t_step + jnp.arange(t_step, dtype=jnp.int32)  # [T] positions
        valid = (pos >= start) & (pos < end)  # [T]
        row = pool_rows(bt_ref, b, h, pos, valid, kv_heads=kv_heads, block_size=block_size, max_blocks=max_blocks)
        return valid, load_pages(row, valid)

    if use_dot:
        o, m, l = _dot_loop(q, load_step, n_steps, cdt)
    else:
        o, m, l = _lane_loop(q, load_step, n_steps, t_step)
    if write_new:
        o, m, l = _fold_new_token(o, m, l, q, k_new, v_new, holds_new)
    _write_outputs(o_ref, lse_ref, o, m, l)


def _decode_pallas_call(
    q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, *, scale, sliding_window, tokens_per_step,
    num_splits, num_warps, num_stages, interpret, debug, use_dot=None, num_heads=None,
):  # fmt: skip
    # num_heads set: q is the projection's whole output [B, H + 2 Hkv, D] and the kernel also writes the current
    # token's K/V into the pools, which it returns after the output (aliased: updated in place when donated).
    write_new = num_heads is not None
    batch, q_rows, d = q.shape
    num_heads = q_rows if num_heads is None else num_heads
    num_blocks, kv_heads, block_size, dp = k_pages.shape  # dp: d, or d // 2 for packed int4
    max_blocks = block_tables.shape[1]
    group = num_heads // kv_heads
    use_dot = group > 1 if use_dot is None else use_dot or group > 1  # grouped heads always use dots
    gp = max(MIN_DOT_ROWS, pl.next_power_of_2(group)) if use_dot else 1
    cdt = compute_dtype(q.dtype, k_pages.dtype)
    quantized = k_scales is not None
    int4 = jnp.dtype(k_pages.dtype) == INT4_PAGE_DTYPE

    steps = pl.cdiv(max_blocks * block_size, tokens_per_step)
    num_splits = max(1, min(num_splits, steps))
    split_tokens = pl.cdiv(steps, num_splits) * tokens_per_step
    num_splits = pl.cdiv(max_blocks * block_size, split_tokens)  # drop splits that would start past the end
    split = num_splits > 1

    rows = num_blocks * kv_heads * block_size
    inputs = [q, k_pages.reshape(rows, dp), v_pages.reshape(rows, dp)]
    whole = lambda shape: pl.BlockSpec(shape, lambda b, h, s: (0,) * len(shape))  # noqa: E731
    in_specs = [whole(q.shape), whole((rows, dp)), whole((rows, dp))]
    if quantized:
        n_scales = rows * (int4_groups(d) if int4 else 1)  # int4: G group scales per row, row-major
        inputs += [k_scales.reshape(n_scales), v_scales.reshape(n_scales)]
        in_specs += [whole((n_scales,)), whole((n_scales,))]
    inputs += [block_tables, lengths]
    in_specs += [whole(block_tables.shape), whole(lengths.shape)]

    if split:
        out_shape = [
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, gp), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, gp, d), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, h, s, 0)),
        ]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, gp, d), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, gp, d), lambda b, h, s: (b, h, 0, 0))]
    aliases = {}
    if write_new:
        aliases = {1: len(out_shape), 2: len(out_shape) + 1}
        out_shape += [jax.ShapeDtypeStruct((rows, dp), k_pages.dtype), jax.ShapeDtypeStruct((rows, dp), v_pages.dtype)]
        out_specs += [whole((rows, dp)), whole((rows, dp))]

    kernel = functools.partial(
        _decode_kernel,
        kv_heads=kv_heads,
        block_size=block_size,
        max_blocks=max_blocks,
        tokens_per_step=tokens_per_step,
        split_tokens=split_tokens,
        sliding_window=sliding_window,
        quantized=quantized,
        int4=int4,
        use_dot=use_dot,
        split=split,
        gp=gp,
        q_scale=scale * LOG2E,
        cdt=cdt,
        group=group,
        num_heads=num_heads,
        write_new=write_new,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        debug=debug,
        name=f"jkv_paged_decode_T{tokens_per_step}_S{num_splits}",
    )(*inputs)

    if write_new:
        *outs, k_rows, v_rows = outs
        pools = (k_rows.reshape(k_pages.shape), v_rows.reshape(v_pages.shape))
        return _combine(outs, split, batch, num_heads, group, gp, d, q.dtype), *pools
    return _combine(outs, split, batch, num_heads, group, gp, d, q.dtype)


def _combine(outs, split, batch, num_heads, group, gp, d, dtype):
    """[B, H, D] in `dtype` from the kernel's outputs: merges context splits, drops the padded query rows."""
    if split:  # combine the splits' partial softmaxes: weights 2^(lse_s - max lse)
        o, lse = outs  # [B, Hkv, S, Gp, D], [B, Hkv, S, Gp]
        top = jnp.max(lse, axis=2, keepdims=True)
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        w = jnp.exp2(lse - top)  # [B, Hkv, S, Gp]; empty splits -> 0
        den = jnp.sum(w, axis=2)
        o = jnp.sum(w[..., None] * o, axis=2) / jnp.where(den > 0, den, 1.0)[..., None]  # [B, Hkv, Gp, D]
        return o[:, :, :group, :].reshape(batch, num_heads, d).astype(dtype)
    (o,) = outs  # [B, Hkv, Gp, D]
    return (o[:, :, :group] if gp > group else o).reshape(batch, num_heads, d)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "tokens_per_step", "num_splits", "num_warps", "num_stages", "interpret",
        "debug",
    ),
)  # fmt: skip
def paged_decode_attention(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [num_blocks, Hkv, bs, D] ([..., D // 2] uint8 for packed int4)
    v_pages: jax.Array,  # [num_blocks, Hkv, bs, D]
    block_tables: jax.Array,  # [B, M] int32
    lengths: jax.Array,  # [B] int32, the current token included
    *,
    k_scales: jax.Array | None = None,  # [num_blocks, Hkv, bs] float16 (int8 / fp8); [..., D // 32] for int4
    v_scales: jax.Array | None = None,
    sm_scale: float | None = None,  # default 1/sqrt(D)
    sliding_window: int | None = None,  # attend to positions >= length - W
    tokens_per_step: int | None = None,  # tokens gathered per loop step (power of two >= 16); None: TUNING
    num_splits: int | None = None,  # context splits per (sequence, kv head); None: fill the GPU
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:  # [B, H, D] in q's dtype
    """Decode attention of one query token per sequence over the paged K/V pools (Pallas, Triton backend).

    Grid (batch, kv_head, context split): each program keeps all query heads of one KV head (GQA/MQA) in one
    tile, streams its share of the context `tokens_per_step` tokens at a time straight from the pool through the
    block table (one step may span several blocks), and keeps an online softmax; splits are merged afterwards.
    int8/fp8/int4 pages are dequantized in the kernel (int4: unpacked per 32-element scale group, see `common`).
    """
    s = validate_inputs(
        q, k_pages, v_pages, block_tables, lengths,
        k_scales=k_scales, v_scales=v_scales, sm_scale=sm_scale, sliding_window=sliding_window,
    )  # fmt: skip
    return _decode_pallas_call(
        q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales,
        **_launch_config(s, sm_scale, sliding_window, tokens_per_step, num_splits, num_warps, num_stages, interpret),
        debug=debug,
    )  # fmt: skip


def _launch_config(s, sm_scale, sliding_window, tokens_per_step, num_splits, num_warps, num_stages, interpret) -> dict:
    """The kernel's static configuration: the TUNING row for these pages, unless the caller overrides it."""
    check_backend_support(s.page_dtype, interpret)
    t_def, w_def, st_def, dot_def = tuned_config(s.page_dtype, s.group, s.head_dim)
    if tokens_per_step is None:
        tokens_per_step = choose_step(s.batch, s.kv_heads, s.max_tokens, t_def)
    if tokens_per_step < 16 or tokens_per_step & (tokens_per_step - 1):
        raise ValueError(f"{tokens_per_step=} must be a power of two >= 16 (a Triton dot operand size).")
    if num_splits is None:
        num_splits = choose_splits(s.batch, s.kv_heads, s.max_tokens, tokens_per_step)
    if num_splits < 1:
        raise ValueError(f"{num_splits=} must be >= 1.")
    return dict(
        scale=default_sm_scale(s.head_dim, sm_scale), sliding_window=sliding_window, tokens_per_step=tokens_per_step,
        num_splits=num_splits, num_warps=num_warps or w_def, num_stages=num_stages or st_def, interpret=interpret,
        use_dot=dot_def or s.group > 1,
    )  # fmt: skip


def _split_qkv(qkv: jax.Array, num_heads: int, kv_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, H + 2 Hkv, D] -> q [B, H, D], k [B, Hkv, D], v [B, Hkv, D]."""
    return qkv[:, :num_heads], qkv[:, num_heads : num_heads + kv_heads], qkv[:, num_heads + kv_heads :]


def _check_write_inputs(qkv, k_pages, v_pages, block_tables, lengths, num_heads, sm_scale, sliding_window, kernel):
    """Validate a write-and-attend call; returns its PagedShapes (the query view stands in for q)."""
    if qkv.ndim != 3:
        raise ValueError(f"{qkv.shape=} must be [batch, num_heads + 2 * kv_heads, head_dim].")
    kv_heads = k_pages.shape[1] if k_pages.ndim == 4 else 0
    if qkv.shape[1] != num_heads + 2 * kv_heads:
        raise ValueError(f"{qkv.shape=} must hold {num_heads} query heads and {kv_heads} key and value heads each: "
                         f"[batch, {num_heads + 2 * kv_heads}, head_dim].")  # fmt: skip
    if jnp.dtype(k_pages.dtype) not in FLOAT_PAGE_DTYPES:
        raise ValueError(f"paged_decode_attention_write takes float pages, not {k_pages.dtype}: quantized pages are "
                         "written by jkv.kv_cache.write_tokens, then read by paged_decode_attention.")  # fmt: skip
    q_view = jax.ShapeDtypeStruct((qkv.shape[0], num_heads, qkv.shape[2]), qkv.dtype)
    return validate_inputs(q_view, k_pages, v_pages, block_tables, lengths, sm_scale=sm_scale,
                           sliding_window=sliding_window, kernel=kernel)  # fmt: skip


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_heads", "sm_scale", "sliding_window", "tokens_per_step", "num_splits", "num_warps", "num_stages",
        "interpret", "debug",
    ),
)  # fmt: skip
def paged_decode_attention_write(
    qkv: jax.Array,  # [B, H + 2 Hkv, D]: the current token's query, key and value heads, in that order
    k_pages: jax.Array,  # [num_blocks, Hkv, bs, D] float pages
    v_pages: jax.Array,  # [num_blocks, Hkv, bs, D]
    block_tables: jax.Array,  # [B, M] int32
    lengths: jax.Array,  # [B] int32, the current token included
    *,
    num_heads: int,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    tokens_per_step: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # out [B, H, D] in qkv's dtype, k_pages, v_pages
    """Write the current token's K/V into its slot and attend, in one kernel: `paged_decode_attention` with the
    engine's per-layer K/V scatter folded in.

    Row b's new K/V go to position lengths[b] - 1 (block `block_tables[b, (lengths[b] - 1) // bs]`); rows with
    length 0 write nothing and return zeros. The pools come back updated; inside a jit that donates them XLA
    updates them in place (the kernel aliases them), so a decode step launches one kernel per layer for the write
    and the attention, and reads q, k and v straight out of the QKV projection's output (no split copies).
    Float pages only (bf16 / f16 / f32).
    """
    s = _check_write_inputs(qkv, k_pages, v_pages, block_tables, lengths, num_heads, sm_scale, sliding_window, True)
    return _decode_pallas_call(
        qkv, k_pages, v_pages, block_tables, lengths, None, None,
        **_launch_config(s, sm_scale, sliding_window, tokens_per_step, num_splits, num_warps, num_stages, interpret),
        debug=debug, num_heads=num_heads,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "tokens_per_step", "num_splits", "num_warps", "num_stages", "interpret",
    ),
)  # fmt: skip
def paged_decode_attention_reference(
    q: jax.Array,  # [B, H, D]
    k_pages: jax.Array,  # [num_blocks, Hkv, bs, D]
    v_pages: jax.Array,  # [num_blocks, Hkv, bs, D]
    block_tables: jax.Array,  # [B, M] int32
    lengths: jax.Array,  # [B] int32
    *,
    k_scales: jax.Array | None = None,  # [num_blocks, Hkv, bs] (quantized pages)
    v_scales: jax.Array | None = None,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    tokens_per_step: int | None = None,  # kernel tuning knobs: accepted and ignored
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, H, D] in q's dtype
    """Decode attention over paged K/V in float32 (gathers each sequence's pages into a dense tensor)."""
    del tokens_per_step, num_splits, num_warps, num_stages, interpret
    s = validate_inputs(
        q, k_pages, v_pages, block_tables, lengths,
        k_scales=k_scales, v_scales=v_scales, sm_scale=sm_scale, sliding_window=sliding_window,
        kernel=False,
    )  # fmt: skip
    scale = default_sm_scale(s.head_dim, sm_scale)
    k = gather_pages_f32(k_pages, k_scales, block_tables)  # [B, Hkv, T, D]
    v = gather_pages_f32(v_pages, v_scales, block_tables)  # [B, Hkv, T, D]
    pos = jnp.arange(s.max_tokens)  # [T]
    valid = pos[None, :] < lengths[:, None]  # [B, T]
    if sliding_window is not None:
        valid &= pos[None, :] >= lengths[:, None] - sliding_window
    # Zero what is masked: unused slots may hold NaN, and 0 * NaN would leak through the weighted sum.
    k = jnp.where(valid[:, None, :, None], k, 0.0)
    v = jnp.where(valid[:, None, :, None], v, 0.0)
    qg = q.astype(jnp.float32).reshape(s.batch, s.kv_heads, s.group, s.head_dim)  # [B, Hkv, G, D]
    logits = jnp.einsum("bkgd,bktd->bkgt", qg, k, precision="highest") * scale  # [B, Hkv, G, T]
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)  # masked -> exp(-inf) = 0
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)  # length 0 -> all-zero weights -> zero output
    out = jnp.einsum("bkgt,bktd->bkgd", p, v, precision="highest")  # [B, Hkv, G, D]
    return out.reshape(s.batch, s.num_heads, s.head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("num_heads", "sm_scale", "sliding_window"))
def paged_decode_attention_write_reference(
    qkv: jax.Array,  # [B, H + 2 Hkv, D]
    k_pages: jax.Array,  # [num_blocks, Hkv, bs, D]
    v_pages: jax.Array,
    block_tables: jax.Array,  # [B, M] int32
    lengths: jax.Array,  # [B] int32, the current token included
    *,
    num_heads: int,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    **unused,  # kernel tuning knobs: accepted and ignored
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`paged_decode_attention_write` as a scatter into the pools and then the decode reference.

    Rows with length 0 write their K/V into the null block 0 (whose contents are garbage by design).
    """
    del unused
    s = _check_write_inputs(qkv, k_pages, v_pages, block_tables, lengths, num_heads, sm_scale, sliding_window, False)
    q, k, v = _split_qkv(qkv, num_heads, s.kv_heads)
    cur = jnp.maximum(lengths - 1, 0)  # [B]
    block = jnp.where(lengths > 0, block_tables[jnp.arange(s.batch), cur // s.block_size], 0)
    offset = cur % s.block_size
    k_pages = k_pages.at[block, :, offset].set(k.astype(k_pages.dtype))
    v_pages = v_pages.at[block, :, offset].set(v.astype(v_pages.dtype))
    out = paged_decode_attention_reference(q, k_pages, v_pages, block_tables, lengths, sm_scale=sm_scale,
                                           sliding_window=sliding_window)  # fmt: skip
    return out, k_pages, v_pages
