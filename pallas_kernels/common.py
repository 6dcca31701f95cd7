"""What the paged-attention kernels share: input validation, the pool's dtypes, dequantization, in-kernel page
loads (one loader per page kind, `page_loader`), GPU facts.

The pool layout (per layer; see `kvspec/layout.py`):

    k_pages, v_pages: [num_blocks, kv_heads, block_size, head_dim]   bf16 / f16 / f32, or int8 / float8_e4m3fn
    k_scales, v_scales: [num_blocks, kv_heads, block_size] float16   quantized pages only: value = data * scale
    block_tables: [batch, max_blocks_per_seq] int32                  entry j holds positions [j*bs, (j+1)*bs)

int4 pages (served by the kernels and the references alike):

    k_pages, v_pages: [num_blocks, kv_heads, block_size, head_dim // 2] uint8   two signed 4-bit values per byte
    k_scales, v_scales: [num_blocks, kv_heads, block_size, head_dim // 32] float16   one scale per 32 elements

Byte j of a row holds element j in its low nibble and element j + head_dim // 2 in its high nibble (split halves,
not interleaved pairs: a kernel unpacks a byte tile into two column ranges of the row without a shuffle), both
two's complement in [-7, 7]; element i's value is nibble * scale[i // 32]. See `pack_int4` / `unpack_int4`. In a
kernel (`load_int4_groups`), bytes [32c, 32c + 32) of a row hold scale group c in their low nibbles and group
c + G/2 in their high nibbles (G = head_dim // 32 groups; head_dim is 64 or 128 there, so no group straddles the
halves): one [T, 32] byte tile gives two whole groups, each dotted with its 32 columns of q and scaled per token.

Block 0 is the null block that padding entries of block tables point to; it may hold anything (NaN included), as
may the slots of a sequence's last block beyond its length: the kernels and references mask both out.

NOTE: Pallas's Triton backend is deprecated upstream since JAX 0.11.0 (in favour of Mosaic GPU, Hopper and newer);
each lowering of a Triton `pallas_call` emits a `DeprecationWarning` ("The Pallas Triton backend is deprecated").
jkv still uses the Triton backend because it is the one that runs on every CUDA GPU from sm80 (24 GB cards
included); `silence_triton_deprecation()` below filters exactly that message, once, on import of a kernel module.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvspec.layout import INT4_GROUP

FLOAT_PAGE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
QUANT_PAGE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
INT4_PAGE_DTYPE = jnp.dtype(jnp.uint8)  # packed int4 pages (two values per byte)
INT4_QMAX = 7.0  # symmetric: -8 is never written
QUERY_DTYPES = FLOAT_PAGE_DTYPES
HEAD_DIMS = (64, 128)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 64
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # float8_e4m3fn conversions need sm89 (Ada) or newer

LOG2E = math.log2(math.e)
TRITON_DEPRECATION_MESSAGE = "The Pallas Triton backend is deprecated"


def silence_triton_deprecation() -> None:
    """Hide the Triton-backend deprecation warning (and only it); see the module docstring."""
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION_MESSAGE, category=DeprecationWarning)


@dataclass(frozen=True, slots=True)
class PagedShapes:
    """Dimensions read off validated inputs."""

    batch: int
    num_heads: int  # query heads
    kv_heads: int
    head_dim: int
    num_blocks: int  # pool size, null block included
    block_size: int
    max_blocks: int  # block-table width
    page_dtype: jnp.dtype
    quantized: bool  # int8, float8_e4m3fn or int4 pages (with scales)
    query_len: int | None = None  # prefill chunk width C; None for decode

    @property
    def int4(self) -> bool:
        """Packed int4 pages (uint8, head_dim // 2 bytes a row, a scale per 32 elements)."""
        return self.page_dtype == INT4_PAGE_DTYPE

    @property
    def group(self) -> int:
        """Query heads per KV head (1: MHA; num_heads: MQA)."""
        return self.num_heads // self.kv_heads

    @property
    def max_tokens(self) -> int:
        return self.max_blocks * self.block_size


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def validate_inputs(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    query_lens: jax.Array | None = None,
    *,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    prefill: bool = False,
    kernel: bool = True,
) -> PagedShapes:
    """Check shapes and dtypes of a paged-attention call; raise a ValueError that says what to fix.

    kernel=False (the pure-jnp references) skips the kernel-only limits on head_dim and block size.
    Decode: q [B, H, D] and `lengths` [B]. Prefill (`prefill=True`): q [B, C, H, D], `lengths` are the context
    lengths [B] and `query_lens` [B]. Works on arrays and on tracers (only static facts are checked).
    """
    if prefill:
        if q.ndim != 4:
            raise ValueError(f"{q.shape=} must be [batch, chunk, num_heads, head_dim] for prefill.")
        batch, query_len, num_heads, head_dim = q.shape
    else:
        if q.ndim != 3:
            raise ValueError(f"{q.shape=} must be [batch, num_heads, head_dim] for decode.")
        batch, num_heads, head_dim = q.shape
        query_len = None
    if jnp.dtype(q.dtype) not in QUERY_DTYPES:
        raise ValueError(f"{q.dtype=} must be one of bfloat16, float16, float32.")
    if k_pages.ndim != 4:
        raise ValueError(f"{k_pages.shape=} must be [num_blocks, kv_heads, block_size, head_dim].")
    if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(
            f"v_pages ({v_pages.shape}, {v_pages.dtype}) must match k_pages ({k_pages.shape}, {k_pages.dtype})."
        )
    num_blocks, kv_heads, page_size, page_head_dim = k_pages.shape
    page_dtype = jnp.dtype(k_pages.dtype)
    int4 = page_dtype == INT4_PAGE_DTYPE
    if kernel and head_dim not in HEAD_DIMS:
        raise ValueError(f"{head_dim=} must be one of {HEAD_DIMS}.")
    if int4 and head_dim % 2:
        raise ValueError(f"{head_dim=} must be even for int4 pages (two values per byte).")
    if int4 and page_head_dim * 2 != head_dim:
        raise ValueError(f"int4 k_pages last dim {page_head_dim} must be head_dim // 2 = {head_dim // 2}.")
    if not int4 and page_head_dim != head_dim:
        raise ValueError(f"k_pages head_dim {page_head_dim} must equal q's {head_dim=}.")
    if kernel and not (_is_pow2(page_size) and MIN_BLOCK_SIZE <= page_size <= MAX_BLOCK_SIZE):
        raise ValueError(f"{page_size=} must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}.")
    if page_size < 1:
        raise ValueError(f"{page_size=} must be positive.")
    if num_blocks < 2:
        raise ValueError(f"{num_blocks=} must be at least 2 (block 0 is the null block).")
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"{num_heads=} must be a multiple of {kv_heads=} (MHA, GQA or MQA).")

    quantized = page_dtype in QUANT_PAGE_DTYPES or int4
    if not quantized and page_dtype not in FLOAT_PAGE_DTYPES:
        raise ValueError(f"{page_dtype=} must be one of bfloat16, float16, float32, int8, float8_e4m3fn, "
                         "or uint8 (packed int4).")  # fmt: skip
    if quantized:
        want = (num_blocks, kv_heads, page_size) + ((int4_groups(head_dim),) if int4 else ())
        if k_scales is None or v_scales is None:
            raise ValueError(f"{page_dtype=} pages need k_scales and v_scales of shape {want}.")
        for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
            if s.shape != want:
                raise ValueError(f"{name}.shape={s.shape} must be {want}.")
            if jnp.dtype(s.dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
                raise ValueError(f"{name}.dtype={s.dtype} must be float16 (or float32).")
    elif k_scales is not None or v_scales is not None:
        raise ValueError(f"k_scales/v_scales are only for int8, float8_e4m3fn or int4 pages, not {page_dtype=}.")

    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"{block_tables.shape=} must be [batch={batch}, max_blocks_per_seq].")
    if jnp.dtype(block_tables.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"{block_tables.dtype=} must be int32.")
    max_blocks = block_tables.shape[1]
    if max_blocks < 1:
        raise ValueError(f"{max_blocks=} (block_tables.shape[1]) must be at least 1.")
    len_name = "context_lens" if prefill else "lengths"
    if lengths.shape != (batch,) or jnp.dtype(lengths.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"{len_name} ({lengths.shape}, {lengths.dtype}) must be int32 of shape ({batch},).")
    if prefill:
        if query_lens is None or query_lens.shape != (batch,):
            raise ValueError(f"query_lens must be int32 of shape ({batch},).")
        if jnp.dtype(query_lens.dtype) != jnp.dtype(jnp.int32):
            raise ValueError(f"{query_lens.dtype=} must be int32.")
    if sliding_window is not None and (not isinstance(sliding_window, (int, np.integer)) or sliding_window < 1):
        raise ValueError(f"{sliding_window=} must be a positive int or None.")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise ValueError(f"{sm_scale=} must be a finite Python float or None (1/sqrt(head_dim)).")
    return PagedShapes(
        batch=batch,
        num_heads=num_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        num_blocks=num_blocks,
        block_size=page_size,
        max_blocks=max_blocks,
        page_dtype=page_dtype,
        quantized=quantized,
        query_len=query_len,
    )


def check_backend_support(page_dtype: jnp.dtype, interpret: bool) -> None:
    """Refuse page dtypes the GPU cannot convert (float8_e4m3fn before sm89). Interpret mode runs everything."""
    if interpret or jnp.dtype(page_dtype) != jnp.dtype(jnp.float8_e4m3fn):
        return
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if dev.platform == "gpu" and cc is not None:
        major, minor = (int(x) for x in str(cc).split(".")[:2])
        if (major, minor) < FP8_MIN_COMPUTE_CAPABILITY:
            raise ValueError(
                f"page_dtype=float8_e4m3fn needs compute capability >= 8.9 (this GPU is {cc}); use int8 pages."
            )


def default_sm_scale(head_dim: int, sm_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def int4_group_size(head_dim: int) -> int:
    """Elements per int4 scale: 32, or the whole row when head_dim < 32 (as the planner counts it)."""
    return min(INT4_GROUP, head_dim)


def int4_groups(head_dim: int) -> int:
    return math.ceil(head_dim / int4_group_size(head_dim))


def pack_int4(q: jax.Array) -> jax.Array:
    """Integers in [-8, 7], [..., D] (D even) -> uint8 [..., D // 2]: byte j = q[j] (low) | q[j + D/2] (high)."""
    half = q.shape[-1] // 2
    nib = q.astype(jnp.int32) & 0xF  # two's complement nibble
    return (nib[..., :half] | (nib[..., half:] << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 [..., D // 2] -> int8 [..., D]: the inverse of `pack_int4` (nibbles sign-extended)."""
    b = packed.astype(jnp.int32)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    sext = lambda n: (n ^ 8) - 8  # 0..15 -> -8..7
    return jnp.concatenate([sext(lo), sext(hi)], axis=-1).astype(jnp.int8)


def dequantize_int4(packed: jax.Array, scales: jax.Array) -> jax.Array:
    """uint8 [..., D // 2] with float16 scales [..., G] -> float32 [..., D]."""
    q = unpack_int4(packed).astype(jnp.float32)  # [..., D]
    d = q.shape[-1]
    g = int4_group_size(d)
    s = jnp.repeat(scales.astype(jnp.float32), g, axis=-1)[..., :d]  # [..., D]: scale of element i is s[i // g]
    return q * s


def quantize_int4(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int4 over groups of 32 of the last axis: (uint8 [..., D // 2], float16 scales [..., G]).

    scale = absmax(group) / 7 rounded to float16; data = clip(round(x / scale), -7, 7). Error per element is at
    most half a step (scale / 2) plus what float16 rounding of the scale adds (|x| * 2^-11).
    """
    xf = x.astype(jnp.float32)
    d = xf.shape[-1]
    if d % 2:
        raise ValueError(f"head_dim={d} must be even for int4 pages (two values per byte).")
    g, n = int4_group_size(d), int4_groups(d)
    pad = n * g - d
    xg = jnp.pad(xf, [(0, 0)] * (xf.ndim - 1) + [(0, pad)]).reshape(*xf.shape[:-1], n, g)  # [..., G, g]
    scale = (jnp.max(jnp.abs(xg), axis=-1) / INT4_QMAX).astype(jnp.float16)  # [..., G]
    s = jnp.where(scale > 0, scale.astype(jnp.float32), 1.0)[..., None]
    q = jnp.clip(jnp.round(xg / s), -INT4_QMAX, INT4_QMAX).reshape(*xf.shape[:-1], n * g)[..., :d]
    return pack_int4(q), scale


def gather_pages_f32(
    pages: jax.Array, scales: jax.Array | None, block_tables: jax.Array
) -> jax.Array:
    """[num_blocks, Hkv, bs, D] pool -> [B, Hkv, M*bs, D] float32 per sequence (dequantized). For references.

    int4 pools ([..., D // 2] uint8 with [..., G] scales) are unpacked to D elements.
    """
    if jnp.dtype(pages.dtype) == INT4_PAGE_DTYPE:
        x = dequantize_int4(pages[block_tables], scales[block_tables])  # [B, M, Hkv, bs, D]
    else:
        x = pages[block_tables].astype(jnp.float32)  # [B, M, Hkv, bs, D]
        if scales is not None:
            x = x * scales[block_tables].astype(jnp.float32)[..., None]
    b, m, hkv, bs, d = x.shape
    return x.transpose(0, 2, 1, 3, 4).reshape(b, hkv, m * bs, d)  # [B, Hkv, T, D]


def quantize_pages(
    pages: jax.Array, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-token-per-head quantization of float pages [..., D] -> (data [..., D], float16 scales [...]).

    Test and benchmark helper (the engine owns its own writer): scale = absmax / qmax, data = round(x / scale).
    dtype "int4" (or jnp.int4) gives packed uint8 pages [..., D // 2] and scales [..., D // 32] (`quantize_int4`).
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.dtype(jnp.int4):
        return quantize_int4(pages)
    x = pages.astype(jnp.float32)
    qmax = 127.0 if dtype == jnp.dtype(jnp.int8) else 448.0
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0).astype(jnp.float16)
    y = x / scale.astype(jnp.float32)[..., None]
    if dtype == jnp.dtype(jnp.int8):
        data = jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8)
    else:
        data = jnp.clip(y, -448.0, 448.0).astype(dtype)
    return data, scale


def dot_precision(dtype):
    # float32 pages: full-precision dots (Triton's default for float32 is tf32)
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else None


def compute_dtype(q_dtype, page_dtype) -> jnp.dtype:
    """Dtype of the dot operands: the page dtype for float pages; for int8/fp8/int4 pages float16 when q is
    float16, else bfloat16 (both hold int8, int4 and e4m3 values exactly)."""
    if jnp.dtype(page_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return jnp.dtype(page_dtype)
    return jnp.dtype(jnp.float16) if jnp.dtype(q_dtype) == jnp.dtype(jnp.float16) else jnp.dtype(jnp.bfloat16)


# --------------------------------------------------------------------------------------------------------------
# int4 inside a kernel
# --------------------------------------------------------------------------------------------------------------


def int4_nibbles(b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A uint8 tile -> its (low, high) nibbles as int32 in [-8, 7], same shape.

    Widen (zero-extend: 0..255), shift the nibble to the top of the int32 and shift it back arithmetically, which
    sign-extends it: low = (b << 28) >> 28, high = (b << 24) >> 28. Plain int32 shifts, for Triton and XLA alike.
    """
    b = b.astype(jnp.int32)
    return (b << 28) >> 28, (b << 24) >> 28


def load_int4_groups(
    data_ref, scales_ref, row: jax.Array, valid: jax.Array, head_dim: int
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Gather T rows of an int4 pool inside a kernel, one 32-element scale group at a time.

    data_ref: [rows, head_dim // 2] uint8 (the flattened pool); scales_ref: [rows * G] (its scales, flattened);
    row, valid: [T]. Returns G nibble tiles int32 [T, 32] (group g = elements [32g, 32g + 32) of each row) and G
    scales float32 [T]; rows that are not valid are not read and come back as 0 (data and scale).

    Byte tile c = bytes [32c, 32c + 32) of the rows carries group c in its low nibbles and group c + G/2 in its
    high nibbles (the split-halves layout), so G/2 uint8 loads of [T, 32] fetch every group, with no shuffle.
    """
    n_groups = head_dim // INT4_GROUP
    assert head_dim % (2 * INT4_GROUP) == 0, f"{head_dim=}: kernels need whole int4 groups in each half"
    half = n_groups // 2
    t = row.shape[0]
    cols = jnp.arange(INT4_GROUP, dtype=jnp.int32)
    valid_2d = jnp.broadcast_to(valid[:, None], (t, INT4_GROUP))
    tiles: list = [None] * n_groups
    for c in range(half):
        idx = (row[:, None], (c * INT4_GROUP + cols)[None, :])  # full integer indexers, as for the other gathers
        packed = plgpu.load(data_ref.at[idx], mask=valid_2d, other=0)  # [T, 32] uint8
        tiles[c], tiles[c + half] = int4_nibbles(packed)  # [T, 32] int32 each
    scales = [
        plgpu.load(scales_ref.at[row * n_groups + g], mask=valid, other=0).astype(jnp.float32)  # [T]
        for g in range(n_groups)
    ]
    return tiles, scales


# --------------------------------------------------------------------------------------------------------------
# Page loads and output stores inside a kernel (shared by the decode and prefill kernels)
# --------------------------------------------------------------------------------------------------------------


class PageTile(NamedTuple):
    """One loop step's K and V rows of one KV head, gathered from the pools, in column chunks of the head.

    k, v: one chunk [T, D] (float, int8 and fp8 pages; fp8 already converted to the compute dtype) or the G int4
    scale groups as int32 nibbles [T, 32] each. k_scale, v_scale: float32 [T] per chunk (each token's scale of
    that chunk), None for float pages. Rows outside the step's valid range are 0 (data and scale), never read.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    k_scale: list[jax.Array] | None
    v_scale: list[jax.Array] | None


def pool_rows(
    bt_ref, b: jax.Array, h: jax.Array, pos: jax.Array, valid: jax.Array, *, kv_heads: int, block_size: int,
    max_blocks: int,
) -> jax.Array:  # fmt: skip
    """[T] rows of the flattened pool ([num_blocks * Hkv * bs, ...]) holding positions `pos` of row b, KV head h.

    Invalid positions read no block-table entry (their block id is the null block 0; their rows are not loaded).
    """
    slot = jnp.minimum(pos // block_size, max_blocks - 1)  # a masked position may lie past the table's width
    page = plgpu.load(bt_ref.at[b, slot], mask=valid, other=0)  # [T] block ids
    return (page * kv_heads + h) * block_size + pos % block_size  # [T]


def _row_indexers(row: jax.Array, valid: jax.Array, d: int) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    # Full integer indexers (not row + slice): the form both Triton lowering and interpret mode take.
    idx = (row[:, None], jnp.arange(d, dtype=jnp.int32)[None, :])
    return idx, jnp.broadcast_to(valid[:, None], (row.shape[0], d))


def load_float_pages(k_ref, v_ref, row: jax.Array, valid: jax.Array) -> PageTile:
    """bf16 / f16 / f32 pages: K and V rows [T, D] in the page dtype, no scales."""
    idx, valid_2d = _row_indexers(row, valid, k_ref.shape[-1])
    k = plgpu.load(k_ref.at[idx], mask=valid_2d, other=0)  # [T, D]
    v = plgpu.load(v_ref.at[idx], mask=valid_2d, other=0)  # [T, D]
    return PageTile([k], [v], None, None)


def load_scaled_pages(k_ref, v_ref, ks_ref, vs_ref, row: jax.Array, valid: jax.Array, *, cdt: jnp.dtype) -> PageTile:
    """int8 / float8_e4m3fn pages: K and V rows [T, D] (int8 as stored, fp8 converted to `cdt`), a scale [T] each."""
    idx, valid_2d = _row_indexers(row, valid, k_ref.shape[-1])
    if k_ref.dtype == jnp.float8_e4m3fn:  # Triton cannot make an fp8 `other`: zero after converting
        k = jnp.where(valid_2d, plgpu.load(k_ref.at[idx], mask=valid_2d).astype(cdt), 0)  # [T, D]
        v = jnp.where(valid_2d, plgpu.load(v_ref.at[idx], mask=valid_2d).astype(cdt), 0)  # [T, D]
    else:
        k = plgpu.load(k_ref.at[idx], mask=valid_2d, other=0)  # [T, D]
        v = plgpu.load(v_ref.at[idx], mask=valid_2d, other=0)  # [T, D]
    k_scale = plgpu.load(ks_ref.at[row], mask=valid, other=0).astype(jnp.float32)  # [T]
    v_scale = plgpu.load(vs_ref.at[row], mask=valid, other=0).astype(jnp.float32)  # [T]
    return PageTile([k], [v], [k_scale], [v_scale])


def load_int4_pages(k_ref, v_ref, ks_ref, vs_ref, row: jax.Array, valid: jax.Array) -> PageTile:
    """Packed int4 pages: G nibble tiles int32 [T, 32] and G scales [T] each for K and V (`load_int4_groups`)."""
    head_dim = 2 * k_ref.shape[-1]  # two elements per byte
    k, k_scale = load_int4_groups(k_ref, ks_ref, row, valid, head_dim)
    v, v_scale = load_int4_groups(v_ref, vs_ref, row, valid, head_dim)
    return PageTile(k, v, k_scale, v_scale)


def page_loader(
    k_ref, v_ref, ks_ref, vs_ref, *, int4: bool, cdt: jnp.dtype
) -> Callable[[jax.Array, jax.Array], PageTile]:
    """The loader for this pool's page kind, bound to its refs: (rows [T], valid [T]) -> PageTile.

    ks_ref / vs_ref are the flattened scales of quantized pools and None for float pools.
    """
    if int4:
        return functools.partial(load_int4_pages, k_ref, v_ref, ks_ref, vs_ref)
    if ks_ref is not None:
        return functools.partial(load_scaled_pages, k_ref, v_ref, ks_ref, vs_ref, cdt=cdt)
    return functools.partial(load_float_pages, k_ref, v_ref)


def store_chunks(o_ref, chunks: list[jax.Array], den: jax.Array) -> None:
    """o_ref [R, D] = chunks / den in o_ref's dtype: one chunk is the whole row, several (int4's scale groups) each
    go to their own static column range."""
    if len(chunks) == 1:
        o_ref[...] = (chunks[0] / den).astype(o_ref.dtype)
        return
    cw = chunks[0].shape[-1]
    for c, oc in enumerate(chunks):
        o_ref[:, pl.ds(c * cw, cw)] = (oc / den).astype(o_ref.dtype)
