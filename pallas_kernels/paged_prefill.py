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

from pallas_kernels.common import default_sm_scale, gather_pages_f32, validate_inputs

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
