"""Block manager: hand-built scenarios with known numbers, then a stateful property test of its invariants."""

import gc
import weakref
from collections.abc import Sequence

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jkv.block_manager import (
    NULL_BLOCK,
    AllocStatus,
    BlockManager,
    NoFreeBlocksError,
    NoFreeSwapSlotsError,
    SequenceStateError,
    UnknownSequenceError,
)
from jkv.block_pool import hash_block_tokens
from planner import PRESETS
from kvspec.layout import BlockLayout, kv_dtype

# Hand-built scenarios ---------------------------------------------------------------------------------------


def test_placeholder_slots_are_not_cached_until_computed():
    """Multi-step decode: slots appended ahead without advance_tokens stay uncomputed (never hashed into the
    prefix cache) until mark_computed hands over their real tokens; the placeholders are never hashed."""
    m = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(6))  # the scheduler's token list: the manager keeps only its length
    m.allocate_prompt(1, tokens)
    m.mark_computed(1, 6, tokens)
    m.append_slots(1, 1)  # the round's input token (in flight)
    m.append_slots(1, 3)  # its later steps' tokens
    tokens += [-1, -1, -1, -1]  # placeholders until the device's samples arrive
    assert m.num_computed_tokens(1) == 6 and m.num_tokens(1) == 10
    assert m.cached_prefix_tokens(list(range(6)) + [7, 8, 9, 10, 0]) == 4  # only the prompt's full block
    tokens[6:] = [7, 8, 9, 10]
    m.mark_computed(1, 10, tokens)
    assert m.cached_prefix_tokens(list(range(6)) + [7, 8, 9, 10, 0]) == 8  # block [4, 5, 7, 8] is cached now
    assert m.cached_prefix_tokens(list(range(6)) + [-1, -1, -1, -1, 0]) == 4  # placeholders never hashed


class _RecordingTokens(Sequence):
    """A token list that records which slices the manager reads."""

    def __init__(self, tokens):
        self.tokens, self.reads = list(tokens), []

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        self.reads.append((index.start, index.stop) if isinstance(index, slice) else index)
        return self.tokens[index]


def test_mark_computed_hashes_exactly_the_tokens_it_is_given():
    """Two sequences with the same counts but different tokens cache different blocks; only the blocks that
    become full and computed are read."""
    m = BlockManager(num_blocks=16, block_size=4)
    a, b = [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 9, 9, 9, 9]
    for sid in (1, 2):
        m.allocate_prompt(sid, [0, 1])  # same prompt, then 6 slots each whose tokens differ
        m.append_slots(sid, 6)
    assert m.num_tokens(1) == m.num_tokens(2) == 8
    m.mark_computed(1, 8, a)
    # Only a's blocks are cached: b shares its first block's tokens [0, 1, 2, 3], not its second.
    assert m.cached_prefix_tokens(a + [0]) == 8 and m.cached_prefix_tokens(b + [0]) == 4
    m.mark_computed(2, 8, b)
    assert m.cached_prefix_tokens(b + [0]) == 8
    # Each prompt hits the blocks of the sequence whose tokens it repeats.
    assert m.allocate_prompt(3, a + [0]).block_table[1] == m.block_table(1)[1]
    assert m.allocate_prompt(4, b + [0]).block_table[1] == m.block_table(2)[1]
    assert m.block_table(1)[1] != m.block_table(2)[1]

    rec = _RecordingTokens(range(9))
    m.allocate_prompt(5, [0])
    m.append_slots(5, 8)
    m.mark_computed(5, 5, rec)  # block 0 becomes full and computed
    m.mark_computed(5, 7, rec)  # no block completes: nothing read
    m.append_slots(5, 0, advance_tokens=rec)  # all 9 computed: block 1 completes
    assert rec.reads == [(0, 4), (4, 8)]


def test_manager_keeps_no_tokens():
    """The per-sequence record holds counts, the table and the hash chain; no token list, and no reference to
    the caller's."""
    m = BlockManager(num_blocks=300, block_size=4)

    class Tokens(list):  # a list one can hold a weak reference to
        pass

    tokens = Tokens(range(10))
    ref = weakref.ref(tokens)
    m.allocate_prompt(1, tokens)
    m.mark_computed(1, 10, tokens)
    m.append_slots(1, 990, advance_tokens=tokens)
    tokens.extend(range(990))
    m.mark_computed(1, 1000, tokens)
    m.fork(1, 2)
    del tokens
    gc.collect()
    assert ref() is None
    assert m.num_tokens(1) == m.num_tokens(2) == 1000
    assert not hasattr(m, "token_ids") and not hasattr(m, "set_tokens")
    for sid in (1, 2):
        record = m._seqs[sid]
        assert not any("token_ids" in name for name in type(record).__slots__)
        # Nothing grows per token: lists are per block (250 of them), the hash chain per full computed block.
        fields = {name: getattr(record, name) for name in type(record).__slots__}
        sizes = {name: len(v) for name, v in fields.items() if isinstance(v, list | tuple)}
        assert sizes == {"block_table": 250, "extra_keys": 0, "block_hashes": 250}


def test_blocks_and_fragmentation_of_two_prompts():
    m = BlockManager(num_blocks=16, block_size=4)
    a = m.allocate_prompt(1, range(10))  # 10 tokens: blocks of 4 + 4 + 2
    b = m.allocate_prompt(2, range(100, 106))  # 6 tokens: 4 + 2
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert NULL_BLOCK not in a.block_table + b.block_table
    assert a.num_cached_tokens == b.num_cached_tokens == 0 and a.new_block_ids == a.block_table
    s = m.stats
    # 5 blocks = 20 slots hold 16 tokens: (20 - 16) / 20 = 0.2 wasted.
    assert (s.num_used_blocks, s.num_free_blocks, s.allocated_slots, s.filled_slots) == (5, 10, 20, 16)
    assert s.internal_fragmentation == pytest.approx(4 / 20)
    assert s.blocks_saved_by_sharing == 0
    # Two more tokens for sequence 1 fill its third block: 18 tokens in 20 slots.
    assert m.append_slots(1, 2) == []
    assert m.stats.num_used_blocks == 5 and m.stats.internal_fragmentation == pytest.approx(2 / 20)
    # One more opens a fourth block: 19 tokens in 24 slots.
    m.append_slots(1, 1)
    assert m.stats.num_used_blocks == 6 and m.stats.internal_fragmentation == pytest.approx(5 / 24)
    m.free(1)
    m.free(2)
    s = m.stats
    assert (s.num_used_blocks, s.num_free_blocks, s.filled_slots, s.internal_fragmentation) == (0, 15, 0, 0.0)


def test_two_requests_sharing_an_eight_token_prefix():
    m = BlockManager(num_blocks=16, block_size=4, bytes_per_block=1000)
    prefix = [5, 6, 7, 8, 9, 10, 11, 12]
    a = m.allocate_prompt(1, prefix + [1, 2])  # 10 tokens, 3 blocks
    m.mark_computed(1, 10, prefix + [1, 2])  # the prefill wrote all 10 tokens: 2 full blocks enter the cache
    b = m.allocate_prompt(2, prefix + [3, 4, 13])  # 11 tokens: the 2 prefix blocks are reused
    assert b.num_cached_tokens == 8 and b.num_new_tokens == 3
    assert b.block_table[:2] == a.block_table[:2] and len(b.new_block_ids) == 1
    s = m.stats
    # Hit rate: 8 tokens hit of 10 + 11 queried.
    assert (s.prefix_hit_tokens, s.prefix_query_tokens) == (8, 21)
    assert s.prefix_hit_rate == pytest.approx(8 / 21)
    # Without sharing 3 + 3 blocks; with it 4 in use: 2 saved, 2000 bytes.
    assert (s.num_references, s.num_used_blocks, s.blocks_saved_by_sharing) == (6, 4, 2)
    assert s.bytes_saved_by_sharing == 2000 and s.sharing_saving_fraction == pytest.approx(2 / 6)
    assert m.pool.ref_count(a.block_table[0]) == 2


def test_prefix_hit_never_covers_the_whole_prompt():
    m = BlockManager(num_blocks=16, block_size=4)
    m.allocate_prompt(1, range(8))
    m.mark_computed(1, 8, range(8))
    # The same 8 tokens again: both blocks are cached, but the last token must be computed for its logits,
    # so only the first block (4 tokens) is reused and block 2 is recomputed into a fresh block.
    again = m.allocate_prompt(2, range(8))
    assert again.num_cached_tokens == 4 and len(again.new_block_ids) == 1
    assert m.cached_prefix_tokens(range(8)) == 4 and m.cached_prefix_tokens(range(9)) == 8
    assert m.cached_prefix_tokens([1]) == 0


def test_only_computed_blocks_are_cached():
    m = BlockManager(num_blocks=16, block_size=4)
    m.allocate_prompt(1, range(12))
    assert m.cached_prefix_tokens(range(13)) == 0  # nothing computed yet: no hit on unwritten K/V
    m.mark_computed(1, 6, range(12))  # chunked prefill: first chunk of 6 tokens -> one full block
    assert m.cached_prefix_tokens(range(13)) == 4
    m.append_slots(1, 1, advance_tokens=range(12))  # a sampled token means all 12 prompt tokens were computed
    assert m.cached_prefix_tokens(range(13)) == 12 and m.num_computed_tokens(1) == 12


def test_freed_prefix_stays_cached_and_its_tail_is_evicted_first():
    m = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    m.allocate_prompt(1, [1, 2, 3, 4, 5, 6, 7])  # 4 blocks, 3 full
    m.mark_computed(1, 7, [1, 2, 3, 4, 5, 6, 7])
    m.free(1)
    s = m.stats
    assert (s.num_used_blocks, s.num_free_blocks, s.num_cached_blocks) == (0, 4, 3)
    # NOTE: freed in reverse order, so the queue is [partial block, block 2, block 1, block 0].
    # A 2-token request takes the empty block; a second takes the LRU cached block: the prefix's tail.
    m.allocate_prompt(2, [50, 51])
    assert m.stats.num_evictions == 0
    m.allocate_prompt(3, [60, 61])
    assert m.stats.num_evictions == 1
    assert m.cached_prefix_tokens([1, 2, 3, 4, 5, 6, 7]) == 4  # blocks 0 and 1 still hit
    m.free(2)
    # 5 tokens = 3 blocks: the 2 cached ones come back out of the free queue, 1 is new (the empty one).
    hit = m.allocate_prompt(4, [1, 2, 3, 4, 9])
    assert hit.num_cached_tokens == 4 and m.stats.num_cached_blocks == 0 and m.stats.num_evictions == 1


def test_extra_keys_separate_caches():
    m = BlockManager(num_blocks=16, block_size=2)
    m.allocate_prompt(1, [1, 2, 3], extra_keys=("adapter-a",))
    m.mark_computed(1, 3, [1, 2, 3])
    assert m.cached_prefix_tokens([1, 2, 3]) == 0
    assert m.cached_prefix_tokens([1, 2, 3], extra_keys=("adapter-b",)) == 0
    assert m.cached_prefix_tokens([1, 2, 3], extra_keys=("adapter-a",)) == 2


def test_prefix_caching_off():
    m = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    m.allocate_prompt(1, range(10))
    m.mark_computed(1, 10, range(10))
    assert m.allocate_prompt(2, range(10)).num_cached_tokens == 0
    assert m.stats.prefix_query_tokens == 0 and m.stats.prefix_hit_rate == 0.0
    m.free(1)
    assert m.stats.num_cached_blocks == 0


def test_fork_then_append_copies_the_shared_block_once():
    m = BlockManager(num_blocks=16, block_size=4)
    m.allocate_prompt(1, range(6))  # blocks [p0 full, p1 with 2 of 4 tokens]
    m.mark_computed(1, 6, range(6))
    m.fork(1, 2)
    p0, p1 = m.block_table(1)
    assert m.block_table(2) == [p0, p1] and m.pool.ref_count(p1) == 2
    assert m.stats.blocks_saved_by_sharing == 2  # 4 references, 2 blocks
    cow = m.append_slots(2, 1)
    assert len(cow) == 1 and cow[0][0] == p1
    dst = cow[0][1]
    assert m.block_table(2) == [p0, dst] and m.block_table(1) == [p0, p1]  # the parent's block is untouched
    assert m.pool.ref_count(p1) == 1 and m.pool.ref_count(p0) == 2
    assert m.append_slots(1, 1) == []  # p1 is private again: written in place
    assert m.stats.num_cow_copies == 1 and m.stats.blocks_saved_by_sharing == 1
    # Filled slots: p0 4 + p1 3 + dst 3 = 10 of 12.
    assert m.stats.filled_slots == 10


def test_fork_of_a_full_last_block_needs_no_copy():
    m = BlockManager(num_blocks=16, block_size=4)
    m.allocate_prompt(1, range(8))
    m.mark_computed(1, 8, range(8))
    m.fork(1, 2)
    assert m.append_slots(2, 1) == [] and m.append_slots(1, 1) == []
    assert m.block_table(1)[:2] == m.block_table(2)[:2] and m.block_table(1)[2] != m.block_table(2)[2]


def test_parallel_sampling_n4_saves_the_prompt_blocks():
    # 4 samples of a 30-token prompt, block size 8: without sharing 4 x 4 blocks; with sharing the 3 full
    # prompt blocks exist once and the partial one (6 tokens) is copied for 3 of the 4 samples.
    m = BlockManager(num_blocks=64, block_size=8)
    m.allocate_prompt(0, range(30))
    m.mark_computed(0, 30, range(30))
    for child in (1, 2, 3):
        m.fork(0, child)
    copies = [m.append_slots(s, 1) for s in range(4)]
    assert sum(len(c) for c in copies) == 3
    s = m.stats
    assert (s.num_references, s.num_used_blocks, s.blocks_saved_by_sharing) == (16, 7, 9)


def test_fork_requires_a_computed_parent_and_new_child_id():
    m = BlockManager(num_blocks=16, block_size=4)
    m.allocate_prompt(1, range(5))
    with pytest.raises(SequenceStateError, match="only 0 of its 5 tokens are computed"):
        m.fork(1, 2)
    m.mark_computed(1, 5, range(5))
    m.allocate_prompt(3, [1])
    with pytest.raises(SequenceStateError, match="already exists"):
        m.fork(1, 3)


def test_admission_watermark_and_never():
    m = BlockManager(num_blocks=11, block_size=4, watermark=0.2)  # 10 usable, keep 2 free at admission
    assert m.watermark_blocks == 2
    assert m.allocation_status(33) is AllocStatus.NEVER  # 9 blocks > 10 - 2
    assert m.allocation_status(32) is AllocStatus.OK  # 8 blocks leave exactly 2
    m.allocate_prompt(1, range(5))  # 2 blocks
    assert m.allocation_status(range(32)) is AllocStatus.LATER and not m.can_allocate(32)
    assert m.can_allocate(24)
    # Without checking, allocation still succeeds below the watermark, and fails only when blocks run out.
    m.allocate_prompt(2, range(100, 132))
    assert m.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError, match="check can_allocate"):
        m.allocate_prompt(3, [1])
    assert 3 not in m and m.stats.num_used_blocks == 10


def test_admission_counts_a_prefix_hit():
    m = BlockManager(num_blocks=6, block_size=4)  # 5 usable
    m.allocate_prompt(1, range(12))
    m.mark_computed(1, 12, range(12))
    # 13 tokens need 4 blocks; 3 are cached in use, so one new block suffices (2 are free).
    assert m.can_allocate(range(13)) and not m.can_allocate(13)
    m.free(1)  # the 3 cached blocks are free now; reusing them takes them out of the free count
    assert m.allocation_status(range(13)) is AllocStatus.OK
    assert m.allocation_status(range(21)) is AllocStatus.NEVER  # 6 blocks > 5


def test_append_needs_blocks_and_fails_cleanly():
    m = BlockManager(num_blocks=3, block_size=2)  # 2 usable
    m.allocate_prompt(1, [1, 2, 3])
    assert m.num_blocks_to_append(1, 1) == 0 and m.num_blocks_to_append(1, 2) == 1
    m.append_slots(1, 1)
    assert not m.can_append_slots(1, 3)
    before, table = m.stats, m.block_table(1)
    with pytest.raises(NoFreeBlocksError, match="check can_append_slots"):
        m.append_slots(1, 3)
    assert m.num_tokens(1) == 4 and m.block_table(1) == table and m.stats == before


def test_swap_out_and_in_of_a_forked_group():
    m = BlockManager(num_blocks=16, block_size=4, num_swap_blocks=8, bytes_per_block=100)
    m.allocate_prompt(1, range(6))
    m.mark_computed(1, 6, range(6))
    m.fork(1, 2)
    m.append_slots(2, 1)  # 2 now owns a copy of the partial block; block 0 stays shared
    shared, p1 = m.block_table(1)
    c1 = m.block_table(2)[1]
    assert m.can_swap_out(1, 2)
    out = m.swap_out(1, 2)
    assert set(out) == {shared, p1, c1} and len(set(out.values())) == 3  # the shared block: one host slot
    assert m.is_swapped(1) and m.stats.num_used_blocks == 0 and m.stats.num_used_swap_slots == 3
    with pytest.raises(SequenceStateError, match="swapped out"):
        m.append_slots(1, 1)
    back = m.swap_in(1, 2)
    assert set(back) == set(out.values())
    t1, t2 = m.block_table(1), m.block_table(2)
    assert t1[0] == t2[0] == back[out[shared]] and m.pool.ref_count(t1[0]) == 2
    assert t1[1] == back[out[p1]] and t2[1] == back[out[c1]]
    s = m.stats
    assert (s.num_used_swap_slots, s.num_blocks_swapped_out, s.num_blocks_swapped_in) == (0, 3, 3)
    assert s.swap_bytes_moved == 600 and s.filled_slots == 4 + 2 + 3
    # Swapped in, the full computed block is findable in the prefix cache again.
    assert m.cached_prefix_tokens(range(7)) == 4


def test_swap_capacity():
    m = BlockManager(num_blocks=16, block_size=2, num_swap_blocks=2)
    m.allocate_prompt(1, range(5))  # 3 blocks
    assert not m.can_swap_out(1)
    with pytest.raises(NoFreeSwapSlotsError, match="recompute instead"):
        m.swap_out(1)
    assert not m.is_swapped(1) and m.stats.num_used_blocks == 3
    m.free(1)
    m.allocate_prompt(2, range(3))
    m.swap_out(2)
    m.allocate_prompt(3, range(100, 130))  # takes all 15 blocks
    assert not m.can_swap_in(2)
    with pytest.raises(NoFreeBlocksError, match="check can_swap_in"):
        m.swap_in(2)
    m.free(2)  # freeing a swapped sequence releases its host slots
    assert m.stats.num_used_swap_slots == 0


def test_sliding_window_drops_blocks_behind_the_window():
    m = BlockManager(num_blocks=16, block_size=4, sliding_window=4)
    a = m.allocate_prompt(1, range(10))
    assert NULL_BLOCK not in a.block_table
    m.mark_computed(1, 10, range(10))
    # The next query is at position 10 and sees keys 7..10: block 0 (positions 0-3) is dropped, block 1
    # (4-7) is kept for key 7.
    assert m.block_table(1) == [NULL_BLOCK, *a.block_table[1:]] and m.stats.num_used_blocks == 2
    m.append_slots(1, 2)  # 12 tokens, 10 computed: first needed key 7, block 1 still needed
    assert m.block_table(1)[1] == a.block_table[1]
    m.mark_computed(1, 12, range(12))  # first needed key 12 - 4 + 1 = 9: block 1 goes too
    assert m.block_table(1)[:2] == [NULL_BLOCK, NULL_BLOCK] and m.stats.num_used_blocks == 1
    with pytest.raises(ValueError, match="behind the window"):
        m.slot_mapping(1, 0, 12)
    assert list(m.slot_mapping(1, 8, 12)) == [a.block_table[2] * 4 + i for i in range(4)]
    m.free(1)
    assert m.num_free_blocks == 15


def test_block_tables_and_slot_mapping():
    m = BlockManager(num_blocks=16, block_size=4)
    a = m.allocate_prompt(1, range(6))
    b = m.allocate_prompt(2, range(1))
    tables = m.block_tables([1, 2], width=3)
    assert tables.dtype.name == "int32" and tables.tolist() == [[*a.block_table, 0], [b.block_table[0], 0, 0]]
    assert m.block_tables([1, 2]).shape == (2, 2)
    with pytest.raises(ValueError, match="narrower"):
        m.block_tables([1], width=1)
    x, y = a.block_table
    assert m.slot_mapping(1, 2, 6).tolist() == [x * 4 + 2, x * 4 + 3, y * 4, y * 4 + 1]
    assert m.slot_mapping(1).shape == (6,)


def test_user_errors_are_clear_exceptions():
    m = BlockManager(num_blocks=8, block_size=4, num_swap_blocks=4)
    with pytest.raises(UnknownSequenceError, match="unknown sequence 7"):
        m.free(7)
    with pytest.raises(ValueError, match="empty"):
        m.allocate_prompt(1, [])
    m.allocate_prompt(1, [1, 2])
    with pytest.raises(SequenceStateError, match="already exists"):
        m.allocate_prompt(1, [3])
    with pytest.raises(SequenceStateError, match="not swapped out"):
        m.swap_in(1)
    with pytest.raises(ValueError, match="distinct"):
        m.swap_out(1, 1)
    m.mark_computed(1, 1, [1, 2])
    with pytest.raises(ValueError, match="between its current count 1 and its 2 tokens"):
        m.mark_computed(1, 0, [1, 2])
    with pytest.raises(ValueError, match="given 1 token ids but 2 are to be computed"):
        m.mark_computed(1, 2, [1])
    with pytest.raises(ValueError, match="given 1 token ids but 2 are to be computed"):
        m.append_slots(1, 1, advance_tokens=[1])
    with pytest.raises(ValueError, match="non-negative int"):
        m.append_slots(1, -1)
    assert (m.num_tokens(1), m.num_computed_tokens(1)) == (2, 1)
    m.free(1)
    with pytest.raises(UnknownSequenceError):
        m.free(1)
    for bad in ({"block_size": 0}, {"watermark": 1.0}, {"sliding_window": 0}):
        with pytest.raises(ValueError):
            BlockManager(**{"num_blocks": 8, "block_size": 4, **bad})


def test_from_layout_of_a_planner_block_layout():
    layout = BlockLayout(PRESETS["gpt2"], kv_dtype("bfloat16"), block_size=16, num_blocks=100)
    m = BlockManager.from_layout(layout, num_swap_blocks=4)
    assert (m.num_blocks, m.block_size, m.bytes_per_block) == (100, 16, 16 * 36_864)
    assert m.stats.num_blocks == 99


# Stateful property test -------------------------------------------------------------------------------------

VOCAB = st.integers(0, 2)  # tiny vocabulary: prompts collide, so prefix hits are frequent


class BlockManagerMachine(RuleBasedStateMachine):
    """Random operation sequences against a model of device and host memory.

    The model plays the scheduler and the engine: it owns each sequence's token list (the manager keeps only
    counts and hashes) and passes it wherever the manager hashes; it writes each token into its slot when
    the token is computed, performs the copy-on-write, swap-out and swap-in copies it is handed (in call
    order), and fills freshly allocated blocks with None (stale K/V). A sequence's blocks must then always
    reproduce its computed tokens, its hash chain must be that of its tokens, and every write must land in a
    block no other sequence references.
    """

    @initialize(
        num_blocks=st.integers(2, 16),
        block_size=st.sampled_from([1, 2, 3, 4]),
        caching=st.booleans(),
        swap_slots=st.integers(0, 8),
        window=st.one_of(st.none(), st.integers(1, 9)),
        watermark=st.sampled_from([0.0, 0.2]),
        data=st.data(),
    )
    def setup(self, num_blocks, block_size, caching, swap_slots, window, watermark, data):
        self.m = BlockManager(
            num_blocks, block_size, enable_prefix_caching=caching, num_swap_blocks=swap_slots,
            sliding_window=window, watermark=watermark,
        )  # fmt: skip
        self.bs = block_size
        self.device = {b: [None] * block_size for b in range(num_blocks)}
        self.host = {s: [None] * block_size for s in range(swap_slots)}
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.prompts: list[list[int]] = []
        self.next_id = 0
        for _ in range(data.draw(st.integers(1, 3))):  # start with work to do
            self.add_prompt(data)

    # helpers
    def resident(self):
        return sorted(s for s in self.tokens if not self.m.is_swapped(s))

    def swapped(self):
        return sorted(s for s in self.tokens if self.m.is_swapped(s))

    def fresh(self, blocks):
        for b in blocks:
            assert b != NULL_BLOCK
            self.device[b] = [None] * self.bs

    def draw_group(self, data, candidates, table_of, null):
        """Some sequences to swap together: any few, or (mostly) one and every sequence sharing with it."""
        if data.draw(st.integers(0, 2)) == 0:
            return data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True))
        first = data.draw(st.sampled_from(candidates))
        mine = set(table_of(first)) - {null}
        return [first] + [s for s in candidates if s != first and mine & set(table_of(s))]

    def write(self, sid, upto):
        """The engine's step: write K/V of tokens [computed, upto) into their slots."""
        table = self.m.block_table(sid)
        for p in range(self.computed[sid], upto):
            b = table[p // self.bs]
            assert b != NULL_BLOCK and self.m.pool.ref_count(b) == 1, "a write into a shared or null block"
            self.device[b][p % self.bs] = self.tokens[sid][p]

    def compute(self, sid, upto):
        """A step, then reporting it with mark_computed."""
        self.write(sid, upto)
        self.m.mark_computed(sid, upto, self.tokens[sid])
        self.computed[sid] = upto

    # rules
    @rule(data=st.data())
    def add_prompt(self, data):
        if self.prompts and data.draw(st.integers(0, 2)):  # mostly: share a prefix with an earlier prompt
            old = data.draw(st.sampled_from(self.prompts))
            keep = data.draw(st.integers(len(old) // 2, len(old)))
            tokens = old[:keep] + data.draw(st.lists(VOCAB, min_size=1, max_size=4))
        else:
            tokens = data.draw(st.lists(VOCAB, min_size=1, max_size=14))
        sid, self.next_id = self.next_id, self.next_id + 1
        status = self.m.allocation_status(tokens)
        before = self.m.stats
        try:
            alloc = self.m.allocate_prompt(sid, tokens)
        except NoFreeBlocksError:
            assert status is not AllocStatus.OK and sid not in self.m and self.m.stats == before
            event("allocate_prompt: out of blocks")
            return
        n, c = len(tokens), alloc.num_cached_tokens
        assert c % self.bs == 0 and 0 <= c < n and alloc.block_table == tuple(self.m.block_table(sid))
        assert len(alloc.block_table) == -(-n // self.bs) and NULL_BLOCK not in alloc.new_block_ids
        if not self.m.enable_prefix_caching:
            assert c == 0
        # A prefix hit hands out blocks that hold exactly the prompt's prefix.
        for p in range(c):
            b = alloc.block_table[p // self.bs]
            if b != NULL_BLOCK:  # (a small window may drop hit blocks at once)
                assert self.device[b][p % self.bs] == tokens[p]
        self.fresh(alloc.new_block_ids)
        event(f"allocate_prompt: prefix hit {'yes' if c else 'no'}")
        self.tokens[sid], self.computed[sid] = list(tokens), c
        self.prompts.append(list(tokens))
        if data.draw(st.booleans()):  # prefill the whole prompt in one step
            self.compute(sid, n)

    @rule(data=st.data())
    def compute_some(self, data):
        pending = [s for s in self.resident() if self.computed[s] < len(self.tokens[s])]
        if not pending:
            return self.add_prompt(data)
        sid = data.draw(st.sampled_from(pending))
        self.compute(sid, data.draw(st.integers(self.computed[sid], len(self.tokens[sid]))))

    @rule(
        data=st.data(),
        new=st.lists(VOCAB, min_size=1, max_size=3),
        mode=st.sampled_from(["mark", "advance", "ahead"]),
    )
    def append(self, data, new, mode):
        if not self.resident():
            return self.add_prompt(data)
        self.append_tokens(data.draw(st.sampled_from(self.resident())), new, mode)

    def append_tokens(self, sid, new, mode="mark"):
        """Slots for sampled tokens. A token is sampled only after the whole sequence is computed: "mark"
        reports that with mark_computed first, "advance" through append_slots' advance_tokens. "ahead" appends
        slots for tokens not sampled yet (multi-step decode), leaving the computed count alone."""
        n = len(self.tokens[sid])
        if mode == "mark":
            self.compute(sid, n)
        elif mode == "advance":
            self.write(sid, n)
        can = self.m.can_append_slots(sid, len(new))  # "advance": the window may free blocks, so may succeed
        old_table = self.m.block_table(sid)
        advance_tokens = self.tokens[sid] if mode == "advance" else None
        try:
            cow = self.m.append_slots(sid, len(new), advance_tokens=advance_tokens)
        except NoFreeBlocksError:
            assert not can and self.m.num_tokens(sid) == n
            event("append: out of blocks")
            return
        finally:
            if mode == "advance":
                self.computed[sid] = n
        assert (can or mode == "advance") and len(cow) <= 1
        event(f"append: {mode}" + ("" if can else ", room made by the window"))
        table = self.m.block_table(sid)
        for src, dst in cow:  # copy-on-write of the partial last block
            assert (
                src == old_table[-1] and dst == table[len(old_table) - 1] and self.m.pool.ref_count(src) >= 1
            )
            self.device[dst] = list(self.device[src])
            event("append: copy-on-write")
        self.fresh(table[len(old_table) :])
        self.tokens[sid] += new

    @rule(data=st.data())
    def fork(self, data):
        if not self.resident():
            return self.add_prompt(data)
        parent = data.draw(st.sampled_from(self.resident()))
        child, self.next_id = self.next_id, self.next_id + 1
        if self.computed[parent] < len(self.tokens[parent]):
            with pytest.raises(SequenceStateError):
                self.m.fork(parent, child)
            self.compute(parent, len(self.tokens[parent]))
        self.m.fork(parent, child)
        self.tokens[child], self.computed[child] = list(self.tokens[parent]), self.computed[parent]
        if data.draw(st.booleans()):  # parallel sampling: each sequence appends its own sampled token
            self.append_tokens(child, [data.draw(VOCAB)])
            self.append_tokens(parent, [data.draw(VOCAB)])

    @rule(data=st.data())
    def free(self, data):
        if not self.tokens:
            return self.add_prompt(data)
        if data.draw(st.integers(0, 9)) == 0:
            with pytest.raises(UnknownSequenceError):
                self.m.free(self.next_id)
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.m.free(sid)
        del self.tokens[sid], self.computed[sid]

    @rule(data=st.data())
    def swap_out(self, data):
        if not self.resident():
            return self.add_prompt(data)
        group = self.draw_group(data, self.resident(), lambda s: self.m.block_table(s), NULL_BLOCK)
        can = self.m.can_swap_out(*group)
        before = self.m.stats
        tables = {s: self.m.block_table(s) for s in group}
        try:
            out = self.m.swap_out(*group)
        except NoFreeSwapSlotsError:
            assert not can and self.m.stats == before
            event("swap_out: out of host slots")
            return
        event("swap_out: done")
        assert can and set(out) == {b for t in tables.values() for b in t if b != NULL_BLOCK}
        for block, slot in out.items():
            self.host[slot] = list(self.device[block])

    @rule(data=st.data())
    def swap_in(self, data):
        if not self.swapped():
            return self.swap_out(data)
        group = self.draw_group(data, self.swapped(), lambda s: self.m._seqs[s].host_table, -1)
        can = self.m.can_swap_in(*group)
        before = self.m.stats
        try:
            back = self.m.swap_in(*group)
        except NoFreeBlocksError:
            assert not can and self.m.stats == before
            event("swap_in: out of blocks")
            return
        event("swap_in: done")
        for slot, block in back.items():
            self.device[block] = list(self.host[slot])

    # invariants
    @invariant()
    def refcounts_match_block_tables(self):
        pool, refs = self.m.pool, {}
        for sid in self.resident():
            table = self.m.block_table(sid)
            assert len(table) == -(-len(self.tokens[sid]) // self.bs)
            if self.m.sliding_window is None:
                assert NULL_BLOCK not in table
            for b in table:
                if b != NULL_BLOCK:
                    refs[b] = refs.get(b, 0) + 1
        free = pool.free_block_ids()
        assert NULL_BLOCK not in free and pool.ref_count(NULL_BLOCK) == 0 and len(set(free)) == len(free)
        for b in range(1, self.m.num_blocks):
            assert pool.ref_count(b) == refs.get(b, 0) >= 0
            assert pool.is_free(b) == (b not in refs) == (b in free)
        assert self.m.num_free_blocks == len(free) == self.m.num_blocks - 1 - len(refs)

    @invariant()
    def host_slots_match_host_tables(self):
        refs = {}
        for sid in self.swapped():
            for slot in self.m._seqs[sid].host_table:
                if slot >= 0:
                    refs[slot] = refs.get(slot, 0) + 1
        swap = self.m.swap_space
        for slot in range(swap.num_slots):
            assert swap.ref_count(slot) == refs.get(slot, 0)
        assert swap.num_used_slots == len(refs)

    @invariant()
    def blocks_reproduce_tokens(self):
        for sid, tokens in self.tokens.items():
            assert self.m.num_tokens(sid) == len(tokens)
            assert self.m.num_computed_tokens(sid) == self.computed[sid]
            # The hash chain is that of the model's tokens (prompt blocks hashed by the lookup, later blocks
            # only once computed), and is never longer than the full blocks.
            hashes, parent = self.m._seqs[sid].block_hashes, None
            assert len(hashes) <= len(tokens) // self.bs
            for i, h in enumerate(hashes):
                parent = hash_block_tokens(parent, tokens[i * self.bs : (i + 1) * self.bs])
                assert h == parent
            if self.m.is_swapped(sid):
                table, memory, null = self.m._seqs[sid].host_table, self.host, -1
            else:
                table, memory, null = self.m.block_table(sid), self.device, NULL_BLOCK
            for p in range(self.computed[sid]):
                if table[p // self.bs] != null:
                    assert memory[table[p // self.bs]][p % self.bs] == tokens[p]

    @invariant()
    def cached_blocks_hold_full_content(self):
        for b in range(1, self.m.num_blocks):
            if self.m.pool.block_hash(b) is not None:
                assert None not in self.device[b]

    @invariant()
    def stats_tell_the_truth(self):
        fill = {}
        for sid in self.resident():
            n = len(self.tokens[sid])
            for i, b in enumerate(self.m.block_table(sid)):
                if b != NULL_BLOCK:
                    assert fill.setdefault(b, min(self.bs, n - i * self.bs)) == min(self.bs, n - i * self.bs)
        s = self.m.stats
        assert s.num_used_blocks == len(fill) and s.filled_slots == sum(fill.values())
        assert s.num_references == sum(self.m.pool.ref_count(b) for b in fill)
        cached = [b for b in self.m.pool.free_block_ids() if self.m.pool.block_hash(b) is not None]
        assert s.num_cached_blocks == len(cached)
        assert 0.0 <= s.internal_fragmentation < 1.0 and 0.0 <= s.prefix_hit_rate < 1.0

    def teardown(self):
        if not hasattr(self, "m"):
            return
        for sid in list(self.tokens):
            self.m.free(sid)
        s = self.m.stats
        assert s.num_free_blocks == self.m.num_blocks - 1 and s.num_used_blocks == 0  # no leak
        assert s.num_used_swap_slots == 0 and s.filled_slots == 0 and s.num_references == 0


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(stateful_step_count=80)  # examples: the profile's max_examples
