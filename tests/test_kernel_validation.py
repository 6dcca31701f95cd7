"""The shared `validate_inputs`: every user-caused shape or dtype mistake is a ValueError naming the culprit."""

import jax.numpy as jnp
import pytest

from pallas_kernels.paged_decode import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.paged_prefill import paged_prefill_attention, paged_prefill_attention_reference

B, H, HKV, D, NB, BS, M = 2, 4, 2, 64, 6, 16, 3


def decode_args(**over):
    args = dict(
        q=jnp.zeros((B, H, D), jnp.bfloat16),
        k_pages=jnp.zeros((NB, HKV, BS, D), jnp.bfloat16),
        v_pages=jnp.zeros((NB, HKV, BS, D), jnp.bfloat16),
        block_tables=jnp.zeros((B, M), jnp.int32),
        lengths=jnp.zeros((B,), jnp.int32),
    )
    args.update(over)
    return args


DECODE_BAD = [
    ("q=[B, D]", dict(q=jnp.zeros((B, D), jnp.bfloat16)), "q.shape"),
    ("int q", dict(q=jnp.zeros((B, H, D), jnp.int32)), "q.dtype"),
    ("head_dim 32", dict(q=jnp.zeros((B, H, 32), jnp.bfloat16), k_pages=jnp.zeros((NB, HKV, BS, 32), jnp.bfloat16),
                         v_pages=jnp.zeros((NB, HKV, BS, 32), jnp.bfloat16)), "head_dim"),
    ("page_size 12", dict(k_pages=jnp.zeros((NB, HKV, 12, D), jnp.bfloat16),
                          v_pages=jnp.zeros((NB, HKV, 12, D), jnp.bfloat16)), "page_size=12"),
    ("page_size 128", dict(k_pages=jnp.zeros((NB, HKV, 128, D), jnp.bfloat16),
                           v_pages=jnp.zeros((NB, HKV, 128, D), jnp.bfloat16)), "page_size=128"),
    ("H % Hkv", dict(k_pages=jnp.zeros((NB, 3, BS, D), jnp.bfloat16),
                     v_pages=jnp.zeros((NB, 3, BS, D), jnp.bfloat16)), "num_heads=4"),
    ("k/v mismatch", dict(v_pages=jnp.zeros((NB, HKV, BS, D), jnp.float16)), "v_pages"),
    ("k head_dim", dict(k_pages=jnp.zeros((NB, HKV, BS, 128), jnp.bfloat16),
                        v_pages=jnp.zeros((NB, HKV, BS, 128), jnp.bfloat16)), "head_dim"),
    ("3-d pages", dict(k_pages=jnp.zeros((NB, BS, D), jnp.bfloat16), v_pages=jnp.zeros((NB, BS, D), jnp.bfloat16)),
     "k_pages.shape"),
    ("int16 pages", dict(k_pages=jnp.zeros((NB, HKV, BS, D), jnp.int16),
                         v_pages=jnp.zeros((NB, HKV, BS, D), jnp.int16)), "page_dtype"),
    ("int8 without scales", dict(k_pages=jnp.zeros((NB, HKV, BS, D), jnp.int8),
                                 v_pages=jnp.zeros((NB, HKV, BS, D), jnp.int8)), "k_scales"),
    ("int8 bad scales", dict(k_pages=jnp.zeros((NB, HKV, BS, D), jnp.int8),
                             v_pages=jnp.zeros((NB, HKV, BS, D), jnp.int8),
                             k_scales=jnp.zeros((NB, HKV, BS, 1), jnp.float16),
                             v_scales=jnp.zeros((NB, HKV, BS), jnp.float16)), "k_scales.shape"),
    ("scales on bf16", dict(k_scales=jnp.zeros((NB, HKV, BS), jnp.float16),
                            v_scales=jnp.zeros((NB, HKV, BS), jnp.float16)), "only for int8"),
    ("int4 without scales", dict(k_pages=jnp.zeros((NB, HKV, BS, D // 2), jnp.uint8),
                                 v_pages=jnp.zeros((NB, HKV, BS, D // 2), jnp.uint8)), "k_scales"),
    ("int4 per-token scales", dict(k_pages=jnp.zeros((NB, HKV, BS, D // 2), jnp.uint8),
                                   v_pages=jnp.zeros((NB, HKV, BS, D // 2), jnp.uint8),
                                   k_scales=jnp.zeros((NB, HKV, BS), jnp.float16),
                                   v_scales=jnp.zeros((NB, HKV, BS), jnp.float16)), "k_scales.shape"),
    ("int4 unpacked width", dict(k_pages=jnp.zeros((NB, HKV, BS, D), jnp.uint8),
                                 v_pages=jnp.zeros((NB, HKV, BS, D), jnp.uint8),
                                 k_scales=jnp.zeros((NB, HKV, BS, D // 32), jnp.float16),
                                 v_scales=jnp.zeros((NB, HKV, BS, D // 32), jnp.float16)), "head_dim // 2"),
    ("tables batch", dict(block_tables=jnp.zeros((B + 1, M), jnp.int32)), "block_tables.shape"),
    ("tables dtype", dict(block_tables=jnp.zeros((B, M), jnp.float32)), "block_tables.dtype"),
    ("lengths shape", dict(lengths=jnp.zeros((B + 1,), jnp.int32)), "lengths"),
    ("lengths dtype", dict(lengths=jnp.zeros((B,), jnp.float32)), "lengths"),
]


# Limits of the kernels only: the jnp references accept any head_dim and block size (the engine's tiny test models).
KERNEL_ONLY = {"head_dim 32", "page_size 12", "page_size 128", "page_size 4"}


@pytest.mark.parametrize("fn", [paged_decode_attention, paged_decode_attention_reference], ids=["kernel", "ref"])
@pytest.mark.parametrize("case", DECODE_BAD, ids=[i for i, _, _ in DECODE_BAD])
def test_decode_rejects(fn, case):
    name, over, needle = case
    if fn is paged_decode_attention_reference and name in KERNEL_ONLY:
        assert bool(jnp.all(fn(**decode_args(**over)) == 0))  # all lengths 0 -> zeros
        return
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        fn(**decode_args(**over), interpret=True)


@pytest.mark.parametrize("fn", [paged_decode_attention, paged_decode_attention_reference], ids=["kernel", "ref"])
@pytest.mark.parametrize("window", [0, -3])
def test_decode_rejects_bad_window(fn, window):
    with pytest.raises(ValueError, match="sliding_window"):
        fn(**decode_args(), sliding_window=window, interpret=True)


def prefill_args(**over):
    args = dict(
        q=jnp.zeros((B, 8, H, D), jnp.bfloat16),
        k_pages=jnp.zeros((NB, HKV, BS, D), jnp.bfloat16),
        v_pages=jnp.zeros((NB, HKV, BS, D), jnp.bfloat16),
        block_tables=jnp.zeros((B, M), jnp.int32),
        context_lens=jnp.zeros((B,), jnp.int32),
        query_lens=jnp.zeros((B,), jnp.int32),
    )
    args.update(over)
    return args


PREFILL_BAD = [
    ("decode-shaped q", dict(q=jnp.zeros((B, H, D), jnp.bfloat16)), "q.shape"),
    ("query_lens shape", dict(query_lens=jnp.zeros((B + 1,), jnp.int32)), "query_lens"),
    ("query_lens dtype", dict(query_lens=jnp.zeros((B,), jnp.float32)), "query_lens"),
    ("context_lens shape", dict(context_lens=jnp.zeros((1,), jnp.int32)), "context_lens"),
    ("page_size 4", dict(k_pages=jnp.zeros((NB, HKV, 4, D), jnp.bfloat16),
                         v_pages=jnp.zeros((NB, HKV, 4, D), jnp.bfloat16)), "page_size=4"),
    ("int4 per-token scales", dict(k_pages=jnp.zeros((NB, HKV, BS, D // 2), jnp.uint8),
                                   v_pages=jnp.zeros((NB, HKV, BS, D // 2), jnp.uint8),
                                   k_scales=jnp.zeros((NB, HKV, BS), jnp.float16),
                                   v_scales=jnp.zeros((NB, HKV, BS), jnp.float16)), "k_scales.shape"),
]


@pytest.mark.parametrize("fn", [paged_prefill_attention, paged_prefill_attention_reference], ids=["kernel", "ref"])
@pytest.mark.parametrize("case", PREFILL_BAD, ids=[i for i, _, _ in PREFILL_BAD])
def test_prefill_rejects(fn, case):
    name, over, needle = case
    if fn is paged_prefill_attention_reference and name in KERNEL_ONLY:
        assert bool(jnp.all(fn(**prefill_args(**over)) == 0))  # no queries -> zeros
        return
    with pytest.raises(ValueError, match=needle):
        fn(**prefill_args(**over), interpret=True)


def test_valid_inputs_pass_validation():
    from pallas_kernels.common import validate_inputs

    a = decode_args()
    s = validate_inputs(a["q"], a["k_pages"], a["v_pages"], a["block_tables"], a["lengths"])
    assert (s.group, s.block_size, s.max_tokens, s.quantized, s.int4) == (2, BS, M * BS, False, False)
    # Packed int4 pages pass the kernels' checks (head_dim 64 -> 32 bytes a row, 2 scale groups).
    pages, scales = jnp.zeros((NB, HKV, BS, D // 2), jnp.uint8), jnp.zeros((NB, HKV, BS, D // 32), jnp.float16)
    s = validate_inputs(a["q"], pages, pages, a["block_tables"], a["lengths"], k_scales=scales, v_scales=scales)
    assert (s.head_dim, s.quantized, s.int4) == (D, True, True)
