"""Block pool layer: chained block hashes, the O(1) free queue, refcounts, LRU prefix cache, swap slots."""

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jkv import block_pool
from jkv.block_pool import (
    NULL_BLOCK,
    BlockPool,
    FreeBlockQueue,
    NoFreeBlocksError,
    NoFreeSwapSlotsError,
    SwapSpace,
    hash_block_tokens,
)

# Hashes -----------------------------------------------------------------------------------------------------


def test_hash_is_a_pure_function_of_parent_tokens_and_extra_keys():
    h1 = hash_block_tokens(None, [1, 2, 3, 4])
    assert h1 == hash_block_tokens(None, (1, 2, 3, 4))  # list or tuple, same content
    assert isinstance(h1, bytes) and len(h1) == 16
    assert h1 != hash_block_tokens(None, [1, 2, 3, 5])
    assert h1 != hash_block_tokens(None, [1, 2, 3, 4], ("lora", 7))
    assert hash_block_tokens(None, [1, 2, 3, 4], ("lora", 7)) == hash_block_tokens(
        None, [1, 2, 3, 4], ("lora", 7)
    )
    # Chained: the same block after a different prefix is a different block.
    a, b = hash_block_tokens(None, [0, 0]), hash_block_tokens(None, [9, 9])
    assert hash_block_tokens(a, [5, 6]) != hash_block_tokens(b, [5, 6])
    assert hash_block_tokens(a, [5, 6]) == hash_block_tokens(hash_block_tokens(None, [0, 0]), [5, 6])
    # Length is part of the key ([1] + [] vs [] + ...), and large token ids are fine.
    assert hash_block_tokens(None, [1]) != hash_block_tokens(None, [1, 0])
    assert hash_block_tokens(None, [50256, 2**40]) != hash_block_tokens(None, [50256, 2**40 + 1])


def test_hash_is_stable_across_processes():
    # No dependence on Python's per-process salted hash(): another interpreter with another PYTHONHASHSEED
    # gets the same digest; the block pool is host-only, so that process never imports JAX.
    code = (
        "import sys; import jkv.block_pool as m;"
        " assert 'jax' not in sys.modules, 'jkv.block_pool imported jax';"
        " print(m.hash_block_tokens(None, [1, 2, 3], ('x',)).hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, block_pool.__file__],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.stdout.strip() == hash_block_tokens(None, [1, 2, 3], ("x",)).hex(), out.stderr


# Free queue -------------------------------------------------------------------------------------------------


def test_free_queue_order_and_membership():
    q = FreeBlockQueue(8, [1, 2, 3])
    q.append(4)
    q.appendleft(5)
    assert list(q) == [5, 1, 2, 3, 4] and len(q) == 5
    q.remove(2)
    assert 2 not in q and 3 in q and 7 not in q and 8 not in q
    assert q.popleft() == 5
    assert list(q) == [1, 3, 4]


@given(st.lists(st.tuples(st.sampled_from(["append", "appendleft", "remove", "popleft"]), st.integers(0, 9))))
def test_free_queue_matches_a_list(ops):
    q, model = FreeBlockQueue(10), []
    for op, block in ops:
        if op in ("append", "appendleft") and block not in model:
            getattr(q, op)(block)
            model.append(block) if op == "append" else model.insert(0, block)
        elif op == "remove" and block in model:
            q.remove(block)
            model.remove(block)
        elif op == "popleft" and model:
            assert q.popleft() == model.pop(0)
        assert list(q) == model and len(q) == len(model)
        assert all((b in q) == (b in model) for b in range(10))


# Pool -------------------------------------------------------------------------------------------------------


def test_null_block_is_never_handed_out():
    pool = BlockPool(5)
    assert pool.num_usable_blocks == 4 and pool.num_free_blocks == 4
    assert sorted(pool.allocate(4)) == [1, 2, 3, 4]  # every usable block, never 0
    assert pool.num_free_blocks == 0 and NULL_BLOCK not in pool.free_block_ids()
    with pytest.raises(NoFreeBlocksError, match="need 1 free KV blocks but only 0 of 4"):
        pool.allocate(1)


def test_allocate_is_all_or_nothing():
    pool = BlockPool(4)
    pool.allocate(1)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2 and pool.num_references == 1


def test_bad_sizes_are_value_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1)
    with pytest.raises(ValueError, match="num_swap_blocks"):
        SwapSpace(-1)


def test_refcounts_touch_and_free():
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.touch([b, b])
    assert pool.ref_count(b) == 3 and pool.num_references == 3 and pool.num_used_blocks == 1
    assert pool.free([b, b]) == []  # still referenced
    assert pool.free([b]) == [b] and pool.is_free(b)
    assert pool.num_references == 0
    with pytest.raises(AssertionError, match="double free"):
        pool.free([b])


def test_cached_block_survives_free_until_evicted():
    pool = BlockPool(3)  # usable blocks 1, 2
    h = hash_block_tokens(None, [7, 7])
    [b] = pool.allocate(1)
    assert pool.cache_block(b, h) and pool.lookup(h) == b
    pool.free([b])
    assert pool.is_free(b) and pool.lookup(h) == b and pool.num_cached_free_blocks == 1
    pool.touch([b])  # a later request with the same prefix takes it back
    assert not pool.is_free(b) and pool.ref_count(b) == 1 and pool.num_cached_free_blocks == 0
    pool.free([b])
    # The empty block goes first; the cached one only when nothing else is left.
    [other] = pool.allocate(1)
    assert other != b and pool.lookup(h) == b and pool.num_evictions == 0
    assert pool.allocate(1) == [b]
    assert pool.lookup(h) is None and pool.block_hash(b) is None and pool.num_evictions == 1


def test_eviction_is_least_recently_freed_first_and_empty_blocks_come_before_cached_ones():
    pool = BlockPool(6)
    blocks = pool.allocate(5)
    hashes = [hash_block_tokens(None, [i]) for i in range(3)]
    for b, h in zip(blocks, hashes):
        pool.cache_block(b, h)
    # Free cached blocks 0, 1, 2 (in that order) and two empty ones after them.
    pool.free([blocks[1], blocks[0], blocks[2], blocks[3], blocks[4]])
    assert pool.free_block_ids() == [blocks[4], blocks[3], blocks[1], blocks[0], blocks[2]]
    assert pool.allocate(3) == [blocks[4], blocks[3], blocks[1]]  # two empty, then the LRU cached block
    assert pool.lookup(hashes[1]) is None and pool.lookup(hashes[0]) == blocks[0]


def test_one_block_per_hash_and_caching_off():
    pool = BlockPool(4)
    h = hash_block_tokens(None, [1])
    a, b = pool.allocate(2)
    assert pool.cache_block(a, h) and not pool.cache_block(b, h)  # b keeps an uncached duplicate
    assert pool.cache_block(a, h)  # idempotent
    assert pool.num_cached_blocks == 1 and pool.block_hash(b) is None
    off = BlockPool(4, enable_caching=False)
    [c] = off.allocate(1)
    assert not off.cache_block(c, h) and off.lookup(h) is None


def test_reset_prefix_cache_drops_free_cached_blocks_only():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    ha, hb = hash_block_tokens(None, [1]), hash_block_tokens(None, [2])
    pool.cache_block(a, ha)
    pool.cache_block(b, hb)
    pool.free([a])
    assert pool.reset_prefix_cache() == 1
    assert pool.lookup(ha) is None and pool.lookup(hb) == b and pool.num_cached_free_blocks == 0
    assert pool.free_block_ids()[0] == a  # now an empty block: reused first


# Swap space -------------------------------------------------------------------------------------------------


def test_swap_space_refcounts_and_capacity():
    swap = SwapSpace(2)
    s0, s1 = swap.allocate(2)
    assert {s0, s1} == {0, 1} and swap.num_free_slots == 0
    with pytest.raises(NoFreeSwapSlotsError, match="need 1 free host swap slots but only 0 of 2"):
        swap.allocate(1)
    swap.touch([s0])
    assert swap.free([s0, s1]) == [s1] and swap.free([s0]) == [s0]
    assert swap.num_used_slots == 0
    with pytest.raises(NoFreeSwapSlotsError):
        SwapSpace(0).allocate(1)
