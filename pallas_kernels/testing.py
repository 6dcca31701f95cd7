"""Random paged-attention cases for tests and benchmarks: pools, shuffled block tables, poisoned unused slots.

`make_case` builds a pool whose used blocks hold random non-zero K/V, points each sequence's block table at
blocks scattered anywhere in the pool (padding entries at the null block 0), and poisons everything a correct
kernel must never read: block 0, every unreferenced block, and the slots of each last block beyond the length
(NaN for float pages, NaN scales and extreme data for quantized pages). page_dtype "int4" gives packed int4
pages (uint8 [..., D // 2] with float16 scales [..., D // 32]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import quantize_pages

# JKV_TEST_GPU=1 on a GPU runs the kernel tests natively; everywhere else the kernels are interpreted.
ON_GPU = os.environ.get("JKV_TEST_GPU") == "1" and jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
# Relative L2 error bounds by page dtype (output rounded to q's dtype; bf16 keeps 8 bits of mantissa).
TOL = {"float32": 2e-3, "float16": 4e-3, "bfloat16": 2e-2, "int8": 2e-2, "float8_e4m3fn": 2e-2, "int4": 2e-2}
INT4_POISON = 0x88  # both nibbles -8, a value `quantize_int4` never writes


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; fails on any non-finite output."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all(), "non-finite values in the output"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


@dataclass
class PagedCase:
    q: jnp.ndarray
    k_pages: jnp.ndarray
    v_pages: jnp.ndarray
    block_tables: jnp.ndarray
    lengths: jnp.ndarray  # decode lengths, or prefill context_lens
    query_lens: jnp.ndarray | None
    k_scales: jnp.ndarray | None
    v_scales: jnp.ndarray | None

    def kwargs(self) -> dict:
        return {"k_scales": self.k_scales, "v_scales": self.v_scales}


def _poison_value(dtype) -> float:
    return float("nan") if jnp.issubdtype(dtype, jnp.floating) else 0.0


def make_case(
    seed: int,
    *,
    batch: int,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    lengths: list[int] | np.ndarray,  # total tokens in the pages per row (decode: incl. current; prefill: ctx+q)
    max_blocks: int | None = None,
    page_dtype=jnp.bfloat16,
    q_dtype=None,
    query_lens: list[int] | None = None,  # prefill: new tokens per row (the last query_lens of lengths)
    chunk: int | None = None,  # prefill: C, the padded chunk width
    extra_blocks: int = 3,
    poison: bool = True,
) -> PagedCase:
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int32)
    assert lengths.shape == (batch,)
    need = -(-lengths // block_size)  # blocks per row
    if max_blocks is None:
        max_blocks = max(1, int(need.max()))
    assert need.max() <= max_blocks
    num_blocks = 1 + int(need.sum()) + extra_blocks
    free = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((batch, max_blocks), np.int32)
    used = np.zeros(num_blocks, bool)
    off = 0
    for b in range(batch):
        n = int(need[b])
        tables[b, :n] = free[off : off + n]
        used[tables[b, :n]] = True
        off += n

    shape = (num_blocks, kv_heads, block_size, head_dim)
    k = rng.standard_normal(shape, dtype=np.float32)
    v = rng.standard_normal(shape, dtype=np.float32)
    # Poison mask over [num_blocks, bs]: unused blocks (block 0 included) and tail slots of last blocks.
    bad = np.repeat(~used[:, None], block_size, axis=1)
    for b in range(batch):
        n, tail = int(need[b]), int(lengths[b]) % block_size
        if n and tail:
            bad[tables[b, n - 1], tail:] = True
    page_dtype = jnp.dtype(page_dtype)
    int4 = page_dtype == jnp.dtype(jnp.int4)
    quantized = page_dtype in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)) or int4
    if int4:  # packed uint8 pages [..., D // 2], float16 scales [..., G]
        kd, ks = (np.asarray(a) for a in quantize_pages(jnp.asarray(k), page_dtype))
        vd, vs = (np.asarray(a) for a in quantize_pages(jnp.asarray(v), page_dtype))
        if poison:
            bm = bad[:, None, :, None]  # broadcast over heads and over bytes / groups
            ks = np.where(bm, np.float16(np.nan), ks)
            vs = np.where(bm, np.float16(np.inf), vs)
            kd = np.where(bm, np.uint8(INT4_POISON), kd)
            vd = np.where(bm, np.uint8(INT4_POISON), vd)
        k_pages, v_pages = jnp.asarray(kd, jnp.uint8), jnp.asarray(vd, jnp.uint8)
        k_scales, v_scales = jnp.asarray(ks, jnp.float16), jnp.asarray(vs, jnp.float16)
    elif quantized:
        kd, ks = (np.asarray(a) for a in quantize_pages(jnp.asarray(k), page_dtype))
        vd, vs = (np.asarray(a) for a in quantize_pages(jnp.asarray(v), page_dtype))
        ks, vs = ks.astype(np.float16), vs.astype(np.float16)
        if poison:
            bm = bad[:, None, :]  # broadcast over heads
            ks = np.where(bm, np.float16(np.nan), ks)
            vs = np.where(bm, np.float16(np.inf), vs)
            big = np.asarray(jnp.asarray(100.0, page_dtype))
            kd = np.where(bm[..., None], big, kd)
            vd = np.where(bm[..., None], big, vd)
        k_pages, v_pages = jnp.asarray(kd, page_dtype), jnp.asarray(vd, page_dtype)
        k_scales, v_scales = jnp.asarray(ks), jnp.asarray(vs)
    else:
        if poison:
            bm = bad[:, None, :, None]
            k = np.where(bm, np.nan, k)
            v = np.where(bm, np.inf, v)
        k_pages, v_pages = jnp.asarray(k, page_dtype), jnp.asarray(v, page_dtype)
        k_scales = v_scales = None

    q_dtype = jnp.dtype(q_dtype or (page_dtype if not quantized else jnp.bfloat16))
    if query_lens is None:
        q = rng.standard_normal((batch, num_heads, head_dim), dtype=np.float32)
        ctx, qlens = jnp.asarray(lengths), None
    else:
        qlens_np = np.asarray(query_lens, np.int32)
        chunk = int(chunk or max(1, qlens_np.max()))
        assert qlens_np.max() <= chunk and (qlens_np <= lengths).all()
        q = rng.standard_normal((batch, chunk, num_heads, head_dim), dtype=np.float32)
        ctx, qlens = jnp.asarray(lengths - qlens_np), jnp.asarray(qlens_np)
    return PagedCase(
        q=jnp.asarray(q, q_dtype),
        k_pages=k_pages,
        v_pages=v_pages,
        block_tables=jnp.asarray(tables),
        lengths=ctx,
        query_lens=qlens,
        k_scales=k_scales,
        v_scales=v_scales,
    )


def unpack_int4_np(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Packed int4 uint8 [..., D // 2] with scales [..., G] -> float64 [..., D], in NumPy.

    Written from the format's definition (byte j: element j in the low nibble, element j + D/2 in the high one,
    two's complement; element i scaled by scales[i // 32]), independently of the jnp and kernel code paths.
    """
    b = np.asarray(packed).astype(np.int64)
    lo, hi = b % 16, b // 16
    nib = np.concatenate([lo, hi], axis=-1)  # [..., D] in 0..15
    nib = np.where(nib >= 8, nib - 16, nib).astype(np.float64)
    d = nib.shape[-1]
    group = min(32, d)
    s = np.asarray(scales, np.float64)
    return nib * s[..., np.arange(d) // group]


def dense_from_case(case: PagedCase) -> tuple[np.ndarray, np.ndarray]:
    """The case's K and V as dense float64 [B, Hkv, M*bs, D] (dequantized; poison included): test oracle input."""
    def dense(pages, scales):
        tables = np.asarray(case.block_tables)
        if pages.dtype == jnp.uint8:  # packed int4
            x = unpack_int4_np(np.asarray(pages)[tables], np.asarray(scales)[tables])  # [B, M, Hkv, bs, D]
        else:
            x = np.asarray(pages.astype(jnp.float32), np.float64)[tables]  # [B, M, Hkv, bs, D]
            if scales is not None:
                x = x * np.asarray(scales, np.float64)[tables][..., None]
        b, m, h, bs, d = x.shape
        return x.transpose(0, 2, 1, 3, 4).reshape(b, h, m * bs, d)

    return dense(case.k_pages, case.k_scales), dense(case.v_pages, case.v_scales)
