"""KV block pool: block metadata, an O(1) LRU free queue, reference counts and the prefix cache (host side).

This is the lowest layer of jkv's block management. It knows block ids, reference counts and content hashes,
never sequences or tokens (that is `jkv.block_manager`) and never device arrays (the engine owns `k_pool` and
`v_pool`; see `kvspec.layout`). Pure Python, no JAX.

- Block 0 is the null block: padding entries of block tables (and blocks a sliding window dropped) point to
  it. It is never handed out, never reference-counted and never in the free queue.
- A block is *free* when its reference count is 0. Every free block sits in one `FreeBlockQueue`, ordered for
  eviction: blocks without reusable content at the front, prefix-cached blocks behind them in
  least-recently-freed order. `allocate` pops from the front, so a cached block is only evicted when no empty
  block is left.
- The prefix cache maps a `BlockHash` (a chained hash of a full block's tokens, see `hash_block_tokens`) to
  the block holding that content. A cached block whose reference count drops to 0 keeps its hash and stays
  findable with `lookup` until `allocate` evicts it; `touch` takes it back out of the free queue.
- `SwapSpace` is the host-side counterpart: a fixed number of block-sized host slots with reference counts,
  for swapping preempted sequences out of the device pool.

Every method is O(1) per block it touches.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import NewType

__all__ = [
    "NULL_BLOCK",
    "BlockHash",
    "BlockManagerError",
    "BlockPool",
    "FreeBlockQueue",
    "NoFreeBlocksError",
    "NoFreeSwapSlotsError",
    "SwapSpace",
    "hash_block_tokens",
]

NULL_BLOCK = 0  # block id of the null block

# A 128-bit digest of one full block's tokens and of everything before them (the parent hash).
BlockHash = NewType("BlockHash", bytes)

_ROOT_PARENT = bytes(16)  # stands in for the parent hash of a sequence's first block


class BlockManagerError(Exception):
    """Base class of the errors a caller of the block pool or block manager can cause."""


class NoFreeBlocksError(BlockManagerError):
    """The device pool has fewer free blocks than an operation needs (check `can_*` first, or preempt)."""


class NoFreeSwapSlotsError(BlockManagerError):
    """The host swap space has fewer free slots than a swap-out needs."""


def hash_block_tokens(
    parent: BlockHash | None, tokens: Sequence[int], extra_keys: tuple[Hashable, ...] = ()
) -> BlockHash:
    """Chained hash of one full block: a pure function of (parent hash, tuple(tokens), extra keys).

    `parent` is the hash of the previous block of the same sequence (None for the first block), so equal
    hashes mean equal *prefixes*, not just equal blocks. `extra_keys` separates caches that must not mix
    although the tokens agree (adapter id, cache salt, ...); they are hashed through `repr`, so use ints,
    strings, bytes and tuples of those. Deterministic across processes (no use of Python's salted `hash`).
    """
    h = hashlib.blake2b(_ROOT_PARENT if parent is None else parent, digest_size=16)
    h.update(len(tokens).to_bytes(8, "little"))
    h.update(array("q", tokens).tobytes())
    if extra_keys:
        h.update(repr(tuple(extra_keys)).encode())
    return BlockHash(h.digest())


class FreeBlockQueue:
    """Doubly linked list of block ids with O(1) `popleft`, `append`, `appendleft`, `remove` and membership.

    Links live in two int lists indexed by block id; index `num_blocks` is a sentinel closing the ring, and
    `-1` in `_prev` marks a block that is not in the queue. No Python objects per block, no `deque.remove`
    scans.
    """

    def __init__(self, num_blocks: int, block_ids: Iterable[int] = ()) -> None:
        self._sentinel = num_blocks
        self._prev = [-1] * (num_blocks + 1)
        self._next = [-1] * (num_blocks + 1)
        self._prev[num_blocks] = self._next[num_blocks] = num_blocks
        self._len = 0
        for block_id in block_ids:
            self.append(block_id)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block_id: int) -> bool:
        return 0 <= block_id < self._sentinel and self._prev[block_id] != -1

    def __iter__(self) -> Iterator[int]:
        """Front (evicted first) to back."""
        node = self._next[self._sentinel]
        while node != self._sentinel:
            yield node
            node = self._next[node]

    def _link_after(self, node: int, block_id: int) -> None:
        assert self._prev[block_id] == -1, f"block {block_id} is already in the free queue"
        nxt = self._next[node]
        self._prev[block_id], self._next[block_id] = node, nxt
        self._next[node] = self._prev[nxt] = block_id
        self._len += 1

    def append(self, block_id: int) -> None:
        self._link_after(self._prev[self._sentinel], block_id)

    def appendleft(self, block_id: int) -> None:
        self._link_after(self._sentinel, block_id)

    def remove(self, block_id: int) -> None:
        prev, nxt = self._prev[block_id], self._next[block_id]
        assert prev != -1, f"block {block_id} is not in the free queue"
        self._next[prev], self._prev[nxt] = nxt, prev
        self._prev[block_id] = self._next[block_id] = -1
        self._len -= 1

    def popleft(self) -> int:
        assert self._len, "popleft from an empty free queue"
        block_id = self._next[self._sentinel]
        self.remove(block_id)
        return block_id


class BlockPool:
    """Reference-counted device blocks `1 .. num_blocks - 1` (block 0 is the null block) and the prefix cache.

    `num_blocks` counts the null block, as `kvspec.layout.BlockLayout.num_blocks` does, so the pool
    matches the device arrays' leading block dimension. With `enable_caching=False`, `cache_block` and
    `lookup` do nothing and freed blocks are plain empty blocks.
    """

    def __init__(self, num_blocks: int, *, enable_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks!r} must be an int >= 2 (block 0 is the null block).")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        # Block metadata, indexed by block id.
        self._ref_cnt = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}  # prefix cache: content hash -> block id
        self._free = FreeBlockQueue(num_blocks, range(1, num_blocks))
        self._num_references = 0  # sum of all reference counts
        self._num_free_cached = 0  # free blocks that still hold a cached hash
        self.num_evictions = 0  # cached blocks whose content allocate() gave up

    # Queries ------------------------------------------------------------------------------------------------
    @property
    def null_block(self) -> int:
        return NULL_BLOCK

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out: empty ones plus evictable cached ones."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold prefix-cached content (evictable, reusable by `touch`)."""
        return self._num_free_cached

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or not."""
        return len(self._cached)

    @property
    def num_references(self) -> int:
        """Sum of all reference counts: the number of block-table entries that point to a real block."""
        return self._num_references

    def ref_count(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hash[block_id]

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (front first); for tests and debugging, O(free blocks)."""
        return list(self._free)

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding the cached content `block_hash` (in use or free), or None."""
        return self._cached.get(block_hash)

    # Operations ---------------------------------------------------------------------------------------------
    def allocate(self, num: int) -> list[int]:
        """Take `num` blocks off the front of the free queue, each with reference count 1.

        A cached block taken this way is evicted: its hash leaves the prefix cache. All or nothing: raises
        `NoFreeBlocksError` (and changes nothing) when fewer than `num` blocks are free.
        """
        if num > len(self._free):
            raise NoFreeBlocksError(
                f"need {num} free KV blocks but only {len(self._free)} of {self.num_usable_blocks} are free; "
                "check can_allocate()/can_append_slots() first, or preempt a sequence."
            )
        out = []
        for _ in range(num):
            block_id = self._free.popleft()
            if self._hash[block_id] is not None:
                self._evict(block_id)
            assert self._ref_cnt[block_id] == 0
            self._ref_cnt[block_id] = 1
            out.append(block_id)
        self._num_references += num
        return out

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash[block_id]
        assert block_hash is not None and self._cached.get(block_hash) == block_id
        del self._cached[block_hash]
        self._hash[block_id] = None
        self._num_free_cached -= 1
        self.num_evictions += 1

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block; a free (cached) block leaves the free queue, in use again."""
        for block_id in block_ids:
            assert block_id != NULL_BLOCK, "the null block is never reference-counted"
            if self._ref_cnt[block_id] == 0:
                assert self._hash[block_id] is not None, f"touching free block {block_id} without content"
                self._free.remove(block_id)
                self._num_free_cached -= 1
            self._ref_cnt[block_id] += 1
            self._num_references += 1

    def free(self, block_ids: Iterable[int]) -> list[int]:
        """Drop one reference from each block, in the order given; returns the blocks that became free.

        A block that becomes free goes to the *front* of the free queue when it holds no cached content (it is
        worth nothing) and to the *back* when it does (least recently freed is evicted first). Callers pass a
        sequence's blocks last-to-first, so its tail is evicted before its head (see `BlockManager.free`).
        """
        released = []
        for block_id in block_ids:
            assert block_id != NULL_BLOCK, "the null block is never reference-counted"
            assert self._ref_cnt[block_id] > 0, f"double free of block {block_id}"
            self._ref_cnt[block_id] -= 1
            self._num_references -= 1
            if self._ref_cnt[block_id] == 0:
                if self._hash[block_id] is None:
                    self._free.appendleft(block_id)
                else:
                    self._free.append(block_id)
                    self._num_free_cached += 1
                released.append(block_id)
        return released

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full, in-use block's content under `block_hash`; True if the block now serves that hash.

        When another block already serves the hash (two sequences computed the same prefix independently),
        this block stays uncached: the cache keeps one block per content.
        """
        if not self.enable_caching:
            return False
        assert self._ref_cnt[block_id] > 0, f"caching free block {block_id}"
        current = self._hash[block_id]
        if current is not None:
            assert current == block_hash, f"block {block_id} is full and already cached under another hash"
            return True
        if block_hash in self._cached:
            return False
        self._hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> int:
        """Forget the content of every *free* cached block (used ones keep it); returns how many dropped."""
        dropped = 0
        for block_hash, block_id in list(self._cached.items()):
            if self._ref_cnt[block_id] == 0:
                del self._cached[block_hash]
                self._hash[block_id] = None
                self._free.remove(block_id)
                self._free.appendleft(block_id)
                dropped += 1
        self._num_free_cached -= dropped
        return dropped


class SwapSpace:
    """Host swap slots `0 .. num_slots - 1` (one device block's K/V each) with reference counts.

    Slots shared by sequences swapped out together (forks of one request) are stored once. Freed slots are
    reused first-in first-out.
    """

    def __init__(self, num_slots: int) -> None:
        if not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_swap_blocks={num_slots!r} must be an int >= 0.")
        self.num_slots = num_slots
        self._ref_cnt = [0] * num_slots
        self._free = FreeBlockQueue(num_slots, range(num_slots))

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def ref_count(self, slot: int) -> int:
        return self._ref_cnt[slot]

    def allocate(self, num: int) -> list[int]:
        """`num` free slots with reference count 1 each; all or nothing."""
        if num > len(self._free):
            raise NoFreeSwapSlotsError(
                f"need {num} free host swap slots but only {len(self._free)} of {self.num_slots} are free; "
                "check can_swap_out() first, recompute instead (free the sequence), or raise num_swap_blocks."
            )
        out = [self._free.popleft() for _ in range(num)]
        for slot in out:
            self._ref_cnt[slot] = 1
        return out

    def touch(self, slots: Iterable[int]) -> None:
        for slot in slots:
            assert self._ref_cnt[slot] > 0, f"touching free swap slot {slot}"
            self._ref_cnt[slot] += 1

    def free(self, slots: Iterable[int]) -> list[int]:
        released = []
        for slot in slots:
            assert self._ref_cnt[slot] > 0, f"double free of swap slot {slot}"
            self._ref_cnt[slot] -= 1
            if self._ref_cnt[slot] == 0:
                self._free.append(slot)
                released.append(slot)
        return released
