"""Paged decode attention: one new query token per sequence against its K/V in the block pools.

`paged_decode_attention` is a Pallas (Triton backend) kernel; `paged_decode_attention_reference` is the same
function in pure `jnp`, computing in float32. Both take the pool layout of `pallas_kernels.common`.

lengths[b] counts the tokens already in the pages INCLUDING the current one (the engine writes the new K/V first),
so the query sits at position lengths[b] - 1 and attends to positions [max(0, lengths[b] - W), lengths[b]).
A row with length 0 returns zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import default_sm_scale, gather_pages_f32, validate_inputs

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
