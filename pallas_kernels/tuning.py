"""Tuned launch parameters of the paged-attention kernels: one small table per kernel, keyed by page kind and shape.

The kernels read their defaults here (`decode_tuned_config`, `prefill_tuned_config`); a caller's explicit knobs
override them. Where each row's values came from, and which rows were measured rather than copied, is in
docs/kernels.md, "Tuning table provenance".
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from pallas_kernels.common import INT4_PAGE_DTYPE, QUANT_PAGE_DTYPES


class DecodeTuning(NamedTuple):
    tokens_per_step: int  # tokens gathered per loop step (a power of two >= 16)
    num_warps: int
    num_stages: int
    use_dot: bool  # MHA: True runs the padded tensor-core path, False the dot-free lane path (grouped: always dots)


class PrefillTuning(NamedTuple):
    block_q: int  # query rows (token x group head) per program
    block_k: int  # key tokens per loop step
    num_warps: int
    num_stages: int


# Decode: keyed by (page kind, grouped?, head_dim). Page kind is "16bit" (bf16/f16), "f32", "quant" (int8/fp8) or
# "int4" (packed uint8); grouped means several query heads share a KV head (GQA/MQA), which always runs dots over a
# [16, D] query tile (rows beyond the group are padding). tokens_per_step does not depend on the block size (a step
# gathers tokens from as many blocks as it spans), so one row serves block sizes 8 to 64. The lane path's [T, D]
# float32 accumulator, not the bytes read, caps tokens_per_step at 64 for 2 warps.
# Values: scripts/bench_attention.py --tune (docs/kernels.md, "Tuning table provenance").
DECODE_TUNING: dict[tuple[str, bool, int], DecodeTuning] = {
    ("16bit", False, 64): DecodeTuning(256, 4, 2, True),
    ("16bit", False, 128): DecodeTuning(128, 4, 2, True),
    ("16bit", True, 64): DecodeTuning(128, 4, 3, True),
    ("16bit", True, 128): DecodeTuning(128, 4, 3, True),
    ("f32", False, 64): DecodeTuning(128, 4, 2, True),
    ("f32", False, 128): DecodeTuning(64, 4, 2, True),
    ("f32", True, 64): DecodeTuning(64, 4, 3, True),
    ("f32", True, 128): DecodeTuning(64, 4, 3, True),
    ("quant", False, 64): DecodeTuning(64, 2, 4, False),
    ("quant", False, 128): DecodeTuning(64, 2, 4, False),
    ("quant", True, 64): DecodeTuning(64, 4, 3, True),
    ("quant", True, 128): DecodeTuning(64, 4, 3, True),
    ("int4", False, 64): DecodeTuning(64, 2, 4, False),
    ("int4", False, 128): DecodeTuning(64, 2, 4, False),
    ("int4", True, 64): DecodeTuning(64, 4, 3, True),
    ("int4", True, 128): DecodeTuning(64, 4, 3, True),
}

# Prefill: keyed by (page kind, head_dim); page kind is "float", "quant" (int8/fp8) or "int4". block_q counts query
# rows of one KV head: (query token, query head of the group) pairs, token-major.
# Values: defaults, not yet tuned (docs/kernels.md, "Tuning table provenance").
PREFILL_TUNING: dict[tuple[str, int], PrefillTuning] = {
    ("float", 64): PrefillTuning(64, 64, 4, 3),
    ("float", 128): PrefillTuning(64, 64, 4, 3),
    ("quant", 64): PrefillTuning(64, 64, 4, 3),
    ("quant", 128): PrefillTuning(64, 64, 4, 3),
    ("int4", 64): PrefillTuning(64, 64, 4, 3),
    ("int4", 128): PrefillTuning(64, 64, 4, 3),
}


def decode_page_kind(page_dtype: jnp.dtype) -> str:
    """The DECODE_TUNING page kind of a pool dtype: "16bit", "f32", "quant" or "int4"."""
    dt = jnp.dtype(page_dtype)
    if dt in QUANT_PAGE_DTYPES:
        return "quant"
    if dt == INT4_PAGE_DTYPE:
        return "int4"
    return "f32" if dt == jnp.dtype(jnp.float32) else "16bit"


def prefill_page_kind(page_dtype: jnp.dtype) -> str:
    """The PREFILL_TUNING page kind of a pool dtype: "float", "quant" or "int4"."""
    dt = jnp.dtype(page_dtype)
    if dt == INT4_PAGE_DTYPE:
        return "int4"
    return "quant" if dt in QUANT_PAGE_DTYPES else "float"


def decode_tuned_config(page_dtype: jnp.dtype, group: int, head_dim: int) -> DecodeTuning:
    """The decode kernel's defaults for pages of `page_dtype`, `group` query heads per KV head and `head_dim`."""
    return DECODE_TUNING[(decode_page_kind(page_dtype), group > 1, head_dim)]


def prefill_tuned_config(page_dtype: jnp.dtype, head_dim: int) -> PrefillTuning:
    """The prefill kernel's defaults for pages of `page_dtype` and `head_dim`."""
    return PREFILL_TUNING[(prefill_page_kind(page_dtype), head_dim)]


# Context splits and step sizes of the decode kernel, from the launch shape -------------------------------------

NUM_SMS = 132  # H100 SXM; only sizes the split heuristic, any GPU runs any split count
TARGET_PROGRAMS = 4 * NUM_SMS  # enough programs in flight to keep every SM streaming K/V
MIN_STEP_TOKENS = 32  # short contexts shrink tokens_per_step down to this to make room for context splits


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_splits(batch: int, kv_heads: int, max_tokens: int, tokens_per_step: int) -> int:
    """Context splits ("flash-decoding"): enough (batch, kv_head, split) programs to fill the GPU, each >= 2 steps."""
    steps = _cdiv(max_tokens, tokens_per_step)
    want = _cdiv(TARGET_PROGRAMS, batch * kv_heads)
    return max(1, min(want, steps // 2))


def choose_step(batch: int, kv_heads: int, max_tokens: int, tokens_per_step: int) -> int:
    """Shrink the tuned step on short contexts until the splits that fill the GPU get >= 2 steps each."""
    want = _cdiv(TARGET_PROGRAMS, batch * kv_heads)
    while tokens_per_step > MIN_STEP_TOKENS and _cdiv(max_tokens, tokens_per_step) < 2 * want:
        tokens_per_step //= 2
    return tokens_per_step
