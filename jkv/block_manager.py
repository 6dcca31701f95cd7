"""Request-level KV block manager (host side): block tables, prefix cache, copy-on-write, fork, swap, window.

The scheduler talks to `BlockManager` only; the manager talks to `jkv.block_pool` (free queue, reference
counts, prefix cache) and never to device arrays. Where the device must move data, a method *returns* the
copies for the engine to perform. Pure Python and NumPy, no JAX.

Lifecycle of one sequence (ids are the caller's ints):

    alloc = m.allocate_prompt(seq_id, prompt)   # table + prefix hit: K/V of prompt[:alloc.num_cached_tokens]
                                                # already sit in the table's first blocks; compute the rest
    m.mark_computed(seq_id, n, tokens)          # after a model step: K/V of tokens[:n] are written
    cow = m.append_slots(seq_id, 1, advance_tokens=tokens)   # a sampled token gets a slot; every earlier
                                                # token is computed (equivalently: mark_computed first, then
                                                # append_slots(seq_id, 1))
    m.fork(seq_id, child_id)                    # n > 1 / beam search: the child shares every block
    host_of = m.swap_out(seq_id); dev_of = m.swap_in(seq_id)   # preemption by swapping
    m.free(seq_id)                              # finished, aborted, or preempted by recomputation

Device operations the engine performs before the next model step reads or writes the blocks involved:
- `append_slots` -> copy-on-write pairs `[(src_block, dst_block)]`: copy all K/V of block src into block dst.
- `swap_out` -> `{device_block: host_slot}`: copy device -> host.  `swap_in` -> `{host_slot: device_block}`.

NOTE: execute the copies in the order the calls returned them. Batching them per kind is equivalent when one
scheduling round runs all swap-outs, then all swap-ins, then all copy-on-writes, and does not swap out a
sequence it allocated, appended to, forked or swapped in during the same round: a block or host slot released
by one call may be handed out again by the next, and only call order guarantees its old content is read before
it is overwritten. The usual round (preempt running sequences, resume swapped ones, then admit new ones)
satisfies this.

Counts, not tokens. The scheduler owns each sequence's token ids; the manager keeps only counts (tokens,
computed tokens), the block table, the hash chain of the leading full blocks, and swap state. Token ids come
in where hashing needs them: the prompt in `allocate_prompt` (prefix lookup) and the sequence's token list in
`mark_computed` / `append_slots(advance_tokens=...)`, of which only the blocks becoming full and computed are
read. The caller must pass the same tokens every time (a computed token never changes): the manager cannot
check them against a copy it does not keep.

Computed tokens. The manager records, per sequence, how many leading tokens have K/V in the cache. Only full,
computed blocks enter the prefix cache (so a prefix hit never reads K/V still being written), a sliding window
drops blocks by computed position, and `fork` needs the parent fully computed (a shared block never has a slot
still to be written). The count advances through `mark_computed` (after each step; needed for chunked prefill)
and through `append_slots(..., advance_tokens=tokens)` (a new token is sampled only after every earlier token
was computed). Slots appended without `advance_tokens` stay uncomputed (multi-step decode, async scheduling:
their tokens are not sampled yet), so nothing is hashed before its token is known.

Sliding window W: a query at position p attends to keys p - W + 1 .. p. Once a block lies wholly before the
first position any future query needs, it is freed and its table entry becomes the null block 0, so table
index i still holds positions [i * block_size, (i + 1) * block_size). The attention kernel must mask those
entries out.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from jkv.block_pool import (
    NULL_BLOCK,
    BlockHash,
    BlockManagerError,
    BlockPool,
    NoFreeBlocksError,
    NoFreeSwapSlotsError,
    SwapSpace,
    hash_block_tokens,
)
from jkv.block_types import (
    AllocStatus,
    BlockManagerStats,
    PromptAllocation,
    SequenceStateError,
    UnknownSequenceError,
)

if TYPE_CHECKING:
    from kvspec.layout import BlockLayout

__all__ = [
    "NULL_BLOCK",
    "AllocStatus",
    "BlockManager",
    "BlockManagerError",
    "BlockManagerStats",
    "NoFreeBlocksError",
    "NoFreeSwapSlotsError",
    "PromptAllocation",
    "SequenceStateError",
    "UnknownSequenceError",
]

NULL_SLOT = -1  # host-table entry of a block the sliding window dropped (nothing to swap)


@dataclass(slots=True)
class _Sequence:
    """The manager's record of one sequence: counts and tables, never token ids (the scheduler owns those)."""

    num_tokens: int  # tokens with a slot
    block_table: list[int]  # device block per block index (NULL_BLOCK where the window dropped it)
    extra_keys: tuple[Hashable, ...]
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    block_hashes: list[BlockHash] = field(default_factory=list)  # chain of the leading full blocks, so far
    num_registered: int = 0  # leading full blocks already offered to the prefix cache
    num_dropped: int = 0  # leading blocks the sliding window replaced by NULL_BLOCK
    host_table: list[int] | None = None  # host slot per block index while swapped out, else None

    def copy(self) -> _Sequence:
        return _Sequence(
            self.num_tokens, list(self.block_table), self.extra_keys, self.num_computed,
            list(self.block_hashes), self.num_registered, self.num_dropped, None,
        )  # fmt: skip


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Block tables of many sequences over one device `BlockPool` and one host `SwapSpace`.

    Args:
        num_blocks: device blocks including the null block 0 (the K/V pools' block dimension).
        block_size: tokens per block.
        enable_prefix_caching: reuse full blocks of earlier prompts with the same prefix.
        watermark: fraction of the usable blocks that admission (`allocation_status`, `can_swap_in`) keeps
            free, so running sequences can grow without immediate preemption. Appends and the allocating
            calls themselves ignore it.
        num_swap_blocks: host swap slots (0: no swapping; preempt by recomputation).
        sliding_window: attention window W in tokens, or None.
        bytes_per_block: K/V bytes of one block, for the byte figures in `stats` (None: unknown).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        watermark: float = 0.01,
        num_swap_blocks: int = 0,
        sliding_window: int | None = None,
        bytes_per_block: int | None = None,
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive int.")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark={watermark!r} must be a fraction in [0, 1).")
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
            raise ValueError(f"sliding_window={sliding_window!r} must be a positive int or None.")
        self._pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._swap = SwapSpace(num_swap_blocks)
        self.block_size = block_size
        self.watermark = watermark
        self.watermark_blocks = int(watermark * self._pool.num_usable_blocks)
        self.sliding_window = sliding_window
        self.bytes_per_block = bytes_per_block
        self._seqs: dict[int, _Sequence] = {}
        # Per-block count of token slots holding a token; meaningful while the block is used or cached.
        self._fill = [0] * num_blocks
        self._filled_slots = 0  # sum of _fill over used blocks
        self._prefix_query_tokens = 0
        self._prefix_hit_tokens = 0
        self._num_cow_copies = 0
        self._num_swapped_out = 0
        self._num_swapped_in = 0

    @classmethod
    def from_layout(cls, layout: BlockLayout, **kwargs) -> BlockManager:
        """A manager for the pools of a planner `BlockLayout` (block count, block size, bytes per block)."""
        kwargs.setdefault("bytes_per_block", layout.bytes_per_block)
        return cls(layout.num_blocks, layout.block_size, **kwargs)

    # Queries ------------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Device blocks including the null block."""
        return self._pool.num_blocks

    @property
    def enable_prefix_caching(self) -> bool:
        return self._pool.enable_caching

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free_blocks

    @property
    def pool(self) -> BlockPool:
        """The device pool, for inspection (reference counts, hashes); mutate it only through the manager."""
        return self._pool

    @property
    def swap_space(self) -> SwapSpace:
        return self._swap

    @property
    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def num_tokens(self, seq_id: int) -> int:
        """Tokens of a sequence that have a slot (computed or not)."""
        return self._get(seq_id).num_tokens

    def num_computed_tokens(self, seq_id: int) -> int:
        return self._get(seq_id).num_computed

    def is_swapped(self, seq_id: int) -> bool:
        return self._get(seq_id).host_table is not None

    def block_table(self, seq_id: int, *, copy: bool = True) -> list[int]:
        """The device block of each block index of a resident sequence (a copy; `copy=False`: the manager's own
        list, valid until the next call that changes the sequence -- read it, never mutate it)."""
        table = self._resident(seq_id, "read the block table of").block_table
        return list(table) if copy else table

    def block_tables(self, seq_ids: Sequence[int], width: int | None = None) -> np.ndarray:
        """Block tables of resident sequences, int32 [len(seq_ids), width], padded with NULL_BLOCK."""
        tables = [self._resident(s, "read the block table of").block_table for s in seq_ids]
        longest = max((len(t) for t in tables), default=0)
        width = longest if width is None else width
        if longest > width:
            raise ValueError(f"width={width} is narrower than the longest block table ({longest} blocks).")
        out = np.full((len(tables), width), NULL_BLOCK, dtype=np.int32)
        for row, table in zip(out, tables):
            row[: len(table)] = table
        return out

    def slot_mapping(self, seq_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat cache slots `block * block_size + offset` of positions [start, stop) of a sequence."""
        seq = self._resident(seq_id, "map slots of")
        stop = seq.num_tokens if stop is None else stop
        if not 0 <= start <= stop <= seq.num_tokens:
            raise ValueError(f"positions [{start}, {stop}) must lie within the {seq.num_tokens} tokens.")
        pos = np.arange(start, stop)
        blocks = np.asarray(seq.block_table, dtype=np.int64)[pos // self.block_size]
        if np.any(blocks == NULL_BLOCK):
            raise ValueError(f"positions [{start}, {stop}) of sequence {seq_id} lie behind the window.")
        return (blocks * self.block_size + pos % self.block_size).astype(np.int32)

    @property
    def stats(self) -> BlockManagerStats:
        pool = self._pool
        return BlockManagerStats(
            block_size=self.block_size,
            num_blocks=pool.num_usable_blocks,
            num_used_blocks=pool.num_used_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_cached_blocks=pool.num_cached_free_blocks,
            num_swap_slots=self._swap.num_slots,
            num_used_swap_slots=self._swap.num_used_slots,
            prefix_query_tokens=self._prefix_query_tokens,
            prefix_hit_tokens=self._prefix_hit_tokens,
            filled_slots=self._filled_slots,
            num_references=pool.num_references,
            num_cow_copies=self._num_cow_copies,
            num_evictions=pool.num_evictions,
            num_blocks_swapped_out=self._num_swapped_out,
            num_blocks_swapped_in=self._num_swapped_in,
            bytes_per_block=self.bytes_per_block,
        )

    # Admission ----------------------------------------------------------------------------------------------
    def cached_prefix_tokens(self, token_ids: Sequence[int], *, extra_keys: tuple[Hashable, ...] = ()) -> int:
        """Tokens of this prompt the prefix cache would serve now (whole blocks, never the last token)."""
        _, hits = self._lookup_prefix(self._as_tokens(token_ids), tuple(extra_keys))
        return len(hits) * self.block_size

    def allocation_status(
        self, prompt: Sequence[int] | int, *, extra_keys: tuple[Hashable, ...] = ()
    ) -> AllocStatus:
        """Whether a prompt (its token ids, counting a prefix hit, or just its length) can be admitted now."""
        if isinstance(prompt, int):
            if prompt < 1:
                raise ValueError(f"a prompt of {prompt} tokens: it must hold at least one token.")
            num_blocks, hits = _cdiv(prompt, self.block_size), []
        else:
            tokens = self._as_tokens(prompt)
            num_blocks = _cdiv(len(tokens), self.block_size)
            _, hits = self._lookup_prefix(tokens, tuple(extra_keys))
        if num_blocks > self._pool.num_usable_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        needed = num_blocks - len(hits) + sum(1 for b in hits if self._pool.ref_count(b) == 0)
        if self._pool.num_free_blocks - needed < self.watermark_blocks:
            return AllocStatus.LATER
        return AllocStatus.OK

    def can_allocate(self, prompt: Sequence[int] | int, *, extra_keys: tuple[Hashable, ...] = ()) -> bool:
        return self.allocation_status(prompt, extra_keys=extra_keys) is AllocStatus.OK

    def allocate_prompt(
        self, seq_id: int, token_ids: Sequence[int], *, extra_keys: tuple[Hashable, ...] = ()
    ) -> PromptAllocation:
        """Give a new sequence blocks for its whole prompt, reusing the blocks of its longest cached prefix.

        The prefix hit covers whole blocks and at most `len(token_ids) - 1` tokens: the last prompt token is
        always computed so the engine gets its logits. The manager keeps no copy of the tokens, only their
        count and the block hashes the lookup computed. Raises `NoFreeBlocksError` (changing nothing) when the
        pool cannot hold the prompt even below the watermark.
        """
        if seq_id in self._seqs:
            raise SequenceStateError(f"sequence {seq_id} already exists; free it first or use a new id.")
        tokens = self._as_tokens(token_ids)
        extra_keys = tuple(extra_keys)
        bs, pool = self.block_size, self._pool
        hashes, hits = self._lookup_prefix(tokens, extra_keys)
        num_new = _cdiv(len(tokens), bs) - len(hits)
        revived = [b for b in hits if pool.ref_count(b) == 0]
        if num_new + len(revived) > pool.num_free_blocks:
            raise NoFreeBlocksError(
                f"sequence {seq_id} needs {num_new + len(revived)} free KV blocks for its {len(tokens)} "
                f"prompt tokens but only {pool.num_free_blocks} are free; check can_allocate() first."
            )
        for b in revived:
            assert self._fill[b] == bs, "a cached block is always full"
            self._filled_slots += bs
        pool.touch(hits)  # before allocate(), so eviction cannot take the hit blocks
        new = pool.allocate(num_new)
        for i, b in enumerate(new, start=len(hits)):
            self._set_fill(b, min(bs, len(tokens) - i * bs))
        num_cached = len(hits) * bs
        seq = _Sequence(len(tokens), hits + new, extra_keys, num_cached, hashes, num_registered=len(hits))
        self._seqs[seq_id] = seq
        if self.enable_prefix_caching:
            self._prefix_query_tokens += len(tokens)
            self._prefix_hit_tokens += num_cached
        self._advance(seq, num_cached, tokens)  # the window may already drop leading hit blocks
        return PromptAllocation(seq_id, tuple(seq.block_table), len(tokens), num_cached, tuple(new))

    # Growth -------------------------------------------------------------------------------------------------
    def num_blocks_to_append(self, seq_id: int, num_new_tokens: int = 1) -> int:
        """Free blocks `append_slots` would take for `num_new_tokens` more tokens (copy-on-write included)."""
        seq = self._resident(seq_id, "append to")
        n = seq.num_tokens
        cow = n % self.block_size != 0 and self._pool.ref_count(seq.block_table[-1]) > 1
        return int(cow) + _cdiv(n + num_new_tokens, self.block_size) - len(seq.block_table)

    def can_append_slots(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        return self.num_blocks_to_append(seq_id, num_new_tokens) <= self._pool.num_free_blocks

    def append_slots(
        self, seq_id: int, num_new_tokens: int = 1, *, advance_tokens: Sequence[int] | None = None
    ) -> list[tuple[int, int]]:
        """Give slots to `num_new_tokens` more tokens (normally one sampled token); returns copy-on-writes.

        With `advance_tokens` (the sequence's token list so far, at least `num_tokens(seq_id)` long) every
        token already in the sequence is first declared computed, as `mark_computed(seq_id,
        num_tokens(seq_id), advance_tokens)` would (see the module docstring); this stays in effect even if
        the append then fails. Without it the computed count is left alone, for a caller that marks it
        itself because earlier tokens may still be placeholders (multi-step decode: the slots of tokens the
        device has not sampled yet). If the last block is partly filled and shared with another sequence
        (after `fork`), this sequence gets a private copy: the result holds that one `(src_block,
        dst_block)` pair, and the shared block itself is left untouched. Raises `NoFreeBlocksError` when the
        pool is short (no slots added; check `can_append_slots`).
        """
        seq = self._resident(seq_id, "append to")
        if not isinstance(num_new_tokens, int) or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens={num_new_tokens!r} must be a non-negative int.")
        if advance_tokens is not None:
            self._check_tokens(seq_id, advance_tokens, seq.num_tokens)
            self._advance(seq, seq.num_tokens, advance_tokens)
        if not num_new_tokens:
            return []
        bs, pool, table = self.block_size, self._pool, seq.block_table
        n_old = seq.num_tokens
        n_new = n_old + num_new_tokens
        partial = n_old % bs
        cow = partial != 0 and pool.ref_count(table[-1]) > 1
        num_new_blocks = _cdiv(n_new, bs) - len(table)
        if int(cow) + num_new_blocks > pool.num_free_blocks:
            raise NoFreeBlocksError(
                f"sequence {seq_id} needs {int(cow) + num_new_blocks} free KV blocks to append "
                f"{num_new_tokens} token(s) but only {pool.num_free_blocks} are free; check "
                "can_append_slots() and preempt."
            )
        copies = []
        if partial:
            if cow:
                # NOTE: copy-on-write. The partly filled last block is shared (fork); writing this sequence's
                # next token into it would change what the other sequences read. Copy it and write the copy.
                src = table[-1]
                [dst] = pool.allocate(1)
                assert not pool.free([src]), "a shared block stays in use after one sharer leaves"
                self._set_fill(dst, self._fill[src])
                table[-1] = dst
                copies.append((src, dst))
                self._num_cow_copies += 1
            assert table[-1] != NULL_BLOCK, "the window never drops the block holding the last token"
            grow = min(num_new_tokens, bs - partial)
            self._fill[table[-1]] += grow
            self._filled_slots += grow
        for i, b in enumerate(pool.allocate(num_new_blocks), start=len(table)):
            self._set_fill(b, min(bs, n_new - i * bs))
            table.append(b)
        seq.num_tokens = n_new
        return copies

    def mark_computed(self, seq_id: int, num_computed_tokens: int, token_ids: Sequence[int]) -> None:
        """Record that K/V of the first `num_computed_tokens` tokens are written to the cache.

        `token_ids` is the sequence's token list, at least `num_computed_tokens` long; only the tokens of
        blocks that become full and computed here are read, to extend the hash chain (prefix caching on).
        Full computed blocks enter the prefix cache; with a sliding window, blocks no future query reaches are
        freed. The count never goes back.
        """
        seq = self._resident(seq_id, "mark computed tokens of")
        n = num_computed_tokens
        if not seq.num_computed <= n <= seq.num_tokens:
            raise ValueError(
                f"num_computed_tokens={n} for sequence {seq_id} must lie between its current count "
                f"{seq.num_computed} and its {seq.num_tokens} tokens."
            )
        self._check_tokens(seq_id, token_ids, n)
        self._advance(seq, n, token_ids)

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        """A new sequence sharing all of the parent's blocks (parallel sampling, beam search).

        The child copies the parent's counts, table and hash chain; its tokens are the caller's to copy. No
        device work: reference counts go up, and the first append to a shared partial block copies it. The
        parent must be fully computed (call `mark_computed` after the step, then fork, then append the sampled
        tokens), so no shared block still has a slot to be written.
        """
        parent = self._resident(parent_seq_id, "fork")
        if child_seq_id in self._seqs:
            raise SequenceStateError(f"cannot fork into sequence {child_seq_id}: that id already exists.")
        if parent.num_computed != parent.num_tokens:
            raise SequenceStateError(
                f"cannot fork sequence {parent_seq_id}: only {parent.num_computed} of its "
                f"{parent.num_tokens} tokens are computed; fork after mark_computed() and before "
                "append_slots()."
            )
        self._seqs[child_seq_id] = parent.copy()
        self._pool.touch(b for b in parent.block_table if b != NULL_BLOCK)

    def free(self, seq_id: int) -> None:
        """Release a sequence (finished, aborted, or preempted by recomputation), resident or swapped out."""
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        # NOTE: free in reverse order. Released blocks that hold cached content join the back of the LRU queue
        # in the order given, and eviction takes from the front. A prefix hit walks the hash chain from block
        # 0 and stops at the first miss, so block i is only reusable while blocks 0..i-1 are cached too.
        # Freeing the tail first puts it nearer eviction than the head: under memory pressure the cache loses
        # the end of a prefix (a shorter hit) instead of its first block (which would strand every later block
        # as dead weight).
        if seq.host_table is not None:
            self._swap.free(s for s in reversed(seq.host_table) if s != NULL_SLOT)
        else:
            self._release(reversed(seq.block_table))

    # Swapping -----------------------------------------------------------------------------------------------
    def can_swap_out(self, *seq_ids: int) -> bool:
        tables = (self._resident(s, "swap out").block_table for s in self._check_group(seq_ids))
        blocks = self._distinct(tables, NULL_BLOCK)
        return len(blocks) <= self._swap.num_free_slots

    def swap_out(self, *seq_ids: int) -> dict[int, int]:
        """Move resident sequences to host slots; returns `{device_block: host_slot}` to copy device -> host.

        Pass the forks of one request together: a block they share takes one host slot. The device blocks are
        released (cached ones stay in the prefix cache until evicted); a block still used by a sequence not
        swapped out stays on the device and is copied anyway.
        """
        seqs = [self._resident(s, "swap out") for s in self._check_group(seq_ids)]
        refs = self._distinct((seq.block_table for seq in seqs), NULL_BLOCK)
        slots = self._swap.allocate(len(refs))
        mapping = dict(zip(refs, slots))
        for block, slot in mapping.items():
            self._swap.touch([slot] * (refs[block] - 1))
        for seq in seqs:
            seq.host_table = [mapping[b] if b != NULL_BLOCK else NULL_SLOT for b in seq.block_table]
            self._release(reversed(seq.block_table))
            seq.block_table = []
        self._num_swapped_out += len(mapping)
        return mapping

    def can_swap_in(self, *seq_ids: int) -> bool:
        """Whether the sequences fit back on the device above the watermark."""
        slots = self._distinct((self._swapped(s).host_table for s in self._check_group(seq_ids)), NULL_SLOT)
        return self._pool.num_free_blocks - len(slots) >= self.watermark_blocks

    def swap_in(self, *seq_ids: int) -> dict[int, int]:
        """Bring swapped-out sequences back; returns `{host_slot: device_block}` to copy host -> device.

        A host slot several of them share becomes one shared device block. Raises `NoFreeBlocksError`
        (changing nothing) when the pool is short.
        """
        seqs = [self._swapped(s) for s in self._check_group(seq_ids)]
        refs = self._distinct((seq.host_table for seq in seqs), NULL_SLOT)
        if len(refs) > self._pool.num_free_blocks:
            raise NoFreeBlocksError(
                f"swapping in {len(seq_ids)} sequence(s) needs {len(refs)} free KV blocks but only "
                f"{self._pool.num_free_blocks} are free; check can_swap_in() first."
            )
        mapping = dict(zip(refs, self._pool.allocate(len(refs))))
        for slot, block in mapping.items():
            self._pool.touch([block] * (refs[slot] - 1))
        bs, filled = self.block_size, set()
        for seq in seqs:
            seq.block_table = [mapping[s] if s != NULL_SLOT else NULL_BLOCK for s in seq.host_table]
            for i, b in enumerate(seq.block_table):
                if b != NULL_BLOCK and b not in filled:  # sharers agree on a shared block's fill
                    self._set_fill(b, min(bs, seq.num_tokens - i * bs))
                    filled.add(b)
            self._swap.free(s for s in reversed(seq.host_table) if s != NULL_SLOT)
            seq.host_table = None
            # Content is back once the engine copies it (before the next step): re-offer the cached blocks.
            for i in range(seq.num_dropped, seq.num_registered):
                self._pool.cache_block(seq.block_table[i], seq.block_hashes[i])
        self._num_swapped_in += len(mapping)
        return mapping

    def reset_prefix_cache(self) -> int:
        """Forget the content of every free cached block; returns how many blocks were dropped."""
        return self._pool.reset_prefix_cache()

    # Internals ----------------------------------------------------------------------------------------------
    def _get(self, seq_id: int) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequenceError(
                f"unknown sequence {seq_id!r}: it was never allocated or has been freed."
            ) from None

    def _resident(self, seq_id: int, action: str) -> _Sequence:
        seq = self._get(seq_id)
        if seq.host_table is not None:
            raise SequenceStateError(
                f"cannot {action} sequence {seq_id}: it is swapped out; swap_in() it first."
            )
        return seq

    def _swapped(self, seq_id: int) -> _Sequence:
        seq = self._get(seq_id)
        if seq.host_table is None:
            raise SequenceStateError(f"cannot swap in sequence {seq_id}: it is not swapped out.")
        return seq

    @staticmethod
    def _check_group(seq_ids: tuple[int, ...]) -> tuple[int, ...]:
        if not seq_ids:
            raise ValueError("name at least one sequence to swap.")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"sequence ids {seq_ids} must be distinct.")
        return seq_ids

    @staticmethod
    def _distinct(tables, null: int) -> dict[int, int]:
        """Distinct entries other than `null` of several tables (first-seen order) -> number of references."""
        refs: dict[int, int] = {}
        for table in tables:
            for entry in table:
                if entry != null:
                    refs[entry] = refs.get(entry, 0) + 1
        return refs

    @staticmethod
    def _as_tokens(token_ids: Sequence[int]) -> list[int]:
        tokens = [int(t) for t in token_ids]
        if not tokens:
            raise ValueError("the prompt is empty: a sequence needs at least one token.")
        return tokens

    def _set_fill(self, block: int, fill: int) -> None:
        """Set the fill of a block that just became used (fresh, copy-on-write copy, or swapped in)."""
        self._fill[block] = fill
        self._filled_slots += fill

    def _release(self, blocks) -> None:
        for b in self._pool.free(b for b in blocks if b != NULL_BLOCK):
            self._filled_slots -= self._fill[b]

    @staticmethod
    def _check_tokens(seq_id: int, token_ids: Sequence[int], needed: int) -> None:
        if len(token_ids) < needed:
            raise ValueError(
                f"sequence {seq_id} was given {len(token_ids)} token ids but {needed} are to be computed: "
                "pass the sequence's whole token list."
            )

    def _extend_hashes(self, seq: _Sequence, num_full: int, tokens: Sequence[int]) -> None:
        """Hash blocks len(block_hashes) .. num_full - 1, reading only their tokens."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            block = [int(t) for t in tokens[i * bs : (i + 1) * bs]]
            hashes.append(hash_block_tokens(parent, block, seq.extra_keys))

    def _lookup_prefix(self, tokens: list[int], extra_keys: tuple) -> tuple[list[BlockHash], list[int]]:
        """Hashes computed on the way and the cached blocks of the longest hit (< len(tokens) tokens)."""
        if not self.enable_prefix_caching:
            return [], []
        bs, hashes, hits = self.block_size, [], []
        for i in range((len(tokens) - 1) // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs], extra_keys))
            block = self._pool.lookup(hashes[-1])
            if block is None:
                break
            hits.append(block)
        return hashes, hits

    def _advance(self, seq: _Sequence, num_computed: int, tokens: Sequence[int]) -> None:
        """Set the computed count; cache newly full computed blocks; let the window drop blocks behind it.

        `tokens` holds at least the sequence's first `num_computed` token ids; only those of blocks becoming
        full and computed are read.
        """
        assert seq.host_table is None and seq.num_computed <= num_computed <= seq.num_tokens
        seq.num_computed = num_computed
        bs = self.block_size
        num_full = num_computed // bs
        if self.enable_prefix_caching and num_full > seq.num_registered:
            self._extend_hashes(seq, num_full, tokens)
            for i in range(seq.num_registered, num_full):
                if seq.block_table[i] != NULL_BLOCK:
                    self._pool.cache_block(seq.block_table[i], seq.block_hashes[i])
            seq.num_registered = num_full
        if self.sliding_window is not None:
            first_needed = num_computed - self.sliding_window + 1  # earliest key a future query attends to
            num_dropped = max(0, first_needed) // bs
            if num_dropped > seq.num_dropped:
                dropped = seq.block_table[seq.num_dropped : num_dropped]
                seq.block_table[seq.num_dropped : num_dropped] = [NULL_BLOCK] * len(dropped)
                seq.num_dropped = num_dropped
                self._release(reversed(dropped))  # reverse: see the NOTE in free()
