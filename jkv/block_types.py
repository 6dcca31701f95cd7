"""The block manager's vocabulary: its errors, the answer to an admission check (`AllocStatus`), what allocating
a prompt did (`PromptAllocation`), and its counters (`BlockManagerStats`, derived figures as properties)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from jkv.block_pool import BlockManagerError


class UnknownSequenceError(BlockManagerError):
    """A sequence id the manager does not hold (never allocated, or already freed)."""


class SequenceStateError(BlockManagerError):
    """An operation that does not fit the sequence's state (id taken, swapped out, not computed, ...)."""


class AllocStatus(enum.Enum):
    OK = "ok"  # fits now, above the watermark
    LATER = "later"  # fits once other sequences free blocks
    NEVER = "never"  # more blocks than the whole pool above the watermark: reject the request


@dataclass(frozen=True, slots=True)
class PromptAllocation:
    """What `allocate_prompt` did: the engine computes K/V of tokens `num_cached_tokens ..` into the table."""

    seq_id: int
    block_table: tuple[int, ...]  # block per block index, ceil(num_tokens / block_size) entries
    num_tokens: int
    num_cached_tokens: int  # prefix-cache hit: whole blocks, always < num_tokens (the last token is computed)
    new_block_ids: tuple[int, ...]  # freshly allocated blocks (the table's entries after the cached ones)

    @property
    def num_new_tokens(self) -> int:
        return self.num_tokens - self.num_cached_tokens


@dataclass(frozen=True, slots=True)
class BlockManagerStats:
    """A snapshot of the manager's counters; derived figures are properties. Blocks exclude the null block."""

    block_size: int
    num_blocks: int  # usable device blocks
    num_used_blocks: int  # reference count > 0
    num_free_blocks: int  # reference count 0, cached ones included
    num_cached_blocks: int  # free blocks still holding prefix-cached content (evictable, reusable)
    num_swap_slots: int
    num_used_swap_slots: int
    prefix_query_tokens: int  # prompt tokens of every allocate_prompt while prefix caching is on
    prefix_hit_tokens: int  # of those, tokens served from the prefix cache
    filled_slots: int  # token slots of used blocks that hold a token (each block counted once)
    num_references: int  # block-table entries pointing to a used block (a shared block counts per table)
    num_cow_copies: int
    num_evictions: int  # cached blocks whose content was given up for a new allocation
    num_blocks_swapped_out: int
    num_blocks_swapped_in: int
    bytes_per_block: int | None  # None: sizes in bytes are unknown

    @property
    def allocated_slots(self) -> int:
        return self.num_used_blocks * self.block_size

    @property
    def prefix_hit_rate(self) -> float:
        """Tokens hit / tokens queried (0.0 before any query)."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def internal_fragmentation(self) -> float:
        """Allocated slots not holding a token / allocated slots (0.0 when nothing is allocated)."""
        allocated = self.allocated_slots
        return (allocated - self.filled_slots) / allocated if allocated else 0.0

    @property
    def blocks_saved_by_sharing(self) -> int:
        """Blocks that would be in use if no block were shared, minus blocks in use."""
        return self.num_references - self.num_used_blocks

    @property
    def sharing_saving_fraction(self) -> float:
        """Share of the unshared footprint that sharing saves (PagedAttention's 'memory saving')."""
        return self.blocks_saved_by_sharing / self.num_references if self.num_references else 0.0

    @property
    def bytes_saved_by_sharing(self) -> int | None:
        return None if self.bytes_per_block is None else self.blocks_saved_by_sharing * self.bytes_per_block

    @property
    def swap_bytes_moved(self) -> int | None:
        """Bytes copied between device and host, both directions."""
        if self.bytes_per_block is None:
            return None
        return (self.num_blocks_swapped_out + self.num_blocks_swapped_in) * self.bytes_per_block
