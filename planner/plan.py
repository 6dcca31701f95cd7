"""The static plan: from a model's shape and a device's memory, the KV block layout, block count and limits.

    budget     = hbm * utilization
    kv_pool    = budget - parameters - activation workspace - runtime reserve
    num_blocks = floor(kv_pool / bytes_per_block)          (block 0 is the null block; num_blocks - 1 are usable)

The activation workspace is sized for the largest step the engine will run: a prefill step of `prefill_chunk`
tokens (padded: up to the next power of two of query positions, `padded_prefill_tokens`), or a decode step of
`max_num_seqs` sequences. When `max_num_seqs` is not given the planner solves for it:
the largest decode batch whose own workspace still leaves room for that many sequences at the shortest listed
length, so every batch the plan promises was paid for in the workspace term.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from kvspec.config import ConfigError, ModelConfig
from kvspec.layout import (
    DTYPE_BYTES, BlockLayout, check_block_size, kv_dtype, layer_bytes_per_token, sequence_layer_blocks,
    weight_dtype_bytes,
)  # fmt: skip
from planner.memory import StepWorkspace, padded_prefill_tokens, param_bytes, runtime_reserve, step_workspace

# The planner's name for kvspec's error: the same class, not a subclass, so `except PlanError` (scripts/plan.py's
# one-line exit 2) also catches what kvspec raises for an unknown model, KV dtype or block size.
PlanError = ConfigError

SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192, 32768, 131072)  # those up to max_seq_len are shown
BATCH_SIZES = (1, 8, 32, 128)
DEFAULT_PREFILL_CHUNK = 2048


@dataclass(frozen=True, slots=True)
class PlanOptions:
    hbm_bytes: int
    dtype: str | None = None  # weights and compute; None: the config's torch_dtype if jkv has it, else bfloat16
    kv_dtype: str | None = None  # None: same as dtype
    block_size: int = 16
    max_seq_len: int | None = None  # None: the model's n_positions (or its sliding window's reach)
    utilization: float = 0.9
    tp: int = 1
    max_num_seqs: int | None = None  # None: solved for (see module docstring)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    reserve_bytes: int | None = None  # None: the calibrated default for the model (planner.memory.runtime_reserve)
    naive_attention: bool = False  # size the score workspace of a non-flash prefill (B*H*T^2)
    seq_lens: tuple[int, ...] | None = None  # a length distribution, for exact fragmentation figures


@dataclass(frozen=True, slots=True)
class Limits:
    seq_len: int
    paged: int  # concurrent sequences with paging
    static: int  # concurrent sequences when each reserves max_seq_len
    blocks_per_seq: float  # all-layer blocks one sequence holds (fractional when sliding layers hold fewer)
    fragmentation: float  # expected fraction of allocated KV slots not holding a token (paged)
    static_waste: float  # fraction of reserved KV slots not holding a token (static)


@dataclass(frozen=True, slots=True)
class ContextLimit:
    batch: int
    paged: int  # longest context every one of `batch` sequences can reach together (0: batch not runnable)
    static: int  # max_seq_len if `batch` static reservations fit, else 0


@dataclass(frozen=True)
class Plan:
    config: ModelConfig
    options: PlanOptions
    layout: BlockLayout
    budget_bytes: int
    param_bytes: int
    workspaces: tuple[StepWorkspace, ...]
    reserve_bytes: int
    max_num_seqs: int
    max_seq_len: int
    by_seq_len: tuple[Limits, ...] = field(default=())
    by_batch: tuple[ContextLimit, ...] = field(default=())

    @property
    def activation_bytes(self) -> int:
        return max(w.total for w in self.workspaces)

    @property
    def kv_pool_bytes(self) -> int:
        return self.layout.pool_bytes

    @property
    def peak_bytes(self) -> int:
        return self.param_bytes + self.kv_pool_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def unused_bytes(self) -> int:
        """Budget left over after rounding the pool down to whole blocks."""
        return self.budget_bytes - self.peak_bytes

    @property
    def kv_tokens(self) -> int:
        return self.layout.usable_blocks * self.layout.block_size

    @property
    def layer_blocks(self) -> int:
        """The pool's capacity in one-layer blocks (a sliding layer's sequence holds fewer of them than a full one)."""
        return self.layout.usable_blocks * self.config.n_layer

    def max_batch(self, seq_len: int) -> int:
        """Concurrent sequences of `seq_len` tokens the pool holds (paged), capped by the engine's batch."""
        per_seq = sequence_layer_blocks(self.config, seq_len, self.layout.block_size)
        return min(self.max_num_seqs, self.layer_blocks // per_seq)

    def static_max_batch(self) -> int:
        """Concurrent sequences when each one reserves max_seq_len tokens of contiguous cache up front (a windowed
        layer reserves its window)."""
        per_layer = layer_bytes_per_token(self.config, self.layout.kv, self.options.tp)
        reach = sum(self.max_seq_len if w is None else min(self.max_seq_len, w) for w in self.config.layer_windows)
        return min(self.max_num_seqs, self.kv_pool_bytes // (reach * per_layer))


def expected_fragmentation(block_size: int, seq_len: int | None = None, seq_lens: tuple[int, ...] | None = None) -> float:
    """Fraction of allocated slots that hold no token.

    With a length distribution the figure is exact: sum(ceil(l/bs)*bs - l) / sum(ceil(l/bs)*bs). Without one the
    last block of a sequence is on average half empty: (bs/2) / (seq_len + bs/2) (a length is as likely to end at
    any slot of its last block).
    """
    if seq_lens:
        allocated = sum(math.ceil(n / block_size) * block_size for n in seq_lens)
        return (allocated - sum(seq_lens)) / allocated if allocated else 0.0
    assert seq_len is not None
    if block_size == 1:
        return 0.0
    return (block_size / 2) / (seq_len + block_size / 2)


def resolve_dtype(config: ModelConfig, dtype: str | None) -> str:
    """The weight dtype a plan uses: the one asked for, else the config's torch_dtype when jkv has it, else bf16."""
    if dtype is not None:
        weight_dtype_bytes(dtype)  # validates
        return dtype
    return config.weight_dtype if config.weight_dtype in DTYPE_BYTES else "bfloat16"


def make_plan(config: ModelConfig, options: PlanOptions) -> Plan:
    """Lay out the KV pool for `config` on a device of `options.hbm_bytes` and derive every limit."""
    o = dataclasses.replace(options, dtype=resolve_dtype(config, options.dtype))
    if not 0 < o.utilization <= 1:
        raise PlanError(f"utilization (--utilization) {o.utilization} must be in (0, 1].")
    if o.hbm_bytes <= 0:
        raise PlanError("device memory must be positive: pass hbm (--hbm) like 24GB.")
    check_block_size(o.block_size)
    if o.prefill_chunk < 1:
        raise PlanError(f"prefill chunk (--prefill-chunk) {o.prefill_chunk} must be at least one token.")
    if o.max_num_seqs is not None and o.max_num_seqs < 1:
        raise PlanError(f"max_num_seqs (--max-num-seqs) {o.max_num_seqs} must be at least 1.")
    max_seq_len = config.n_positions if o.max_seq_len is None else o.max_seq_len
    if not 1 <= max_seq_len <= config.n_positions:
        raise PlanError(
            f"max_seq_len (--max-seq-len) {max_seq_len} must be between 1 and the model's {config.n_positions} "
            "positions."
        )
    if o.block_size > max_seq_len:
        raise PlanError(
            f"block size (--block-size) {o.block_size} is longer than the longest sequence ({max_seq_len} tokens): "
            "every sequence would hold one mostly empty block; use 16 (the default) or another power of two below "
            "it."
        )
    if o.seq_lens is not None:
        too_long = [n for n in o.seq_lens if not 1 <= n <= max_seq_len]
        if too_long:
            raise PlanError(
                f"sequence length {too_long[0]} in seq_lens (--seq-lens) is outside 1..{max_seq_len}, the longest "
                "sequence planned: drop it or raise max_seq_len (--max-seq-len)."
            )
    dtype_bytes = weight_dtype_bytes(o.dtype)
    kv = kv_dtype(o.kv_dtype or o.dtype)
    layout_1 = BlockLayout(config, kv, o.block_size, num_blocks=1, tp=o.tp)  # validates tp
    budget = int(o.hbm_bytes * o.utilization)
    params = param_bytes(config, dtype_bytes, o.tp)
    reserve = runtime_reserve(config) if o.reserve_bytes is None else o.reserve_bytes
    if reserve < 0:
        raise PlanError(f"reserve (--reserve) {reserve:,} B must not be negative.")
    fixed = params + reserve
    if fixed >= budget:
        experts = f" (all {config.moe.num_experts} experts of every MoE layer are resident)" if config.moe else ""
        raise PlanError(
            f"{o.hbm_bytes:,} B at utilization {o.utilization} leaves {budget:,} B, which cannot hold "
            f"{config.name}'s {params:,} B of {o.dtype} weights{experts} plus the {reserve:,} B runtime reserve "
            f"per device: raise hbm (--hbm), utilization (--utilization) or tp (--tp), or use a smaller dtype (--dtype)."
        )

    workspaces = lambda batch: step_workspaces(config, o, batch, max_seq_len)  # noqa: E731

    def usable_layer_blocks(batch: int) -> int:
        left = budget - fixed - max(w.total for w in workspaces(batch))
        return max(0, left // layout_1.bytes_per_block - 1) * config.n_layer

    _, per_short = short_sequence(config, o, max_seq_len)
    if o.max_num_seqs is not None:
        batch = o.max_num_seqs
    else:
        # The largest B with usable_layer_blocks(B) // per_short >= B. The left side only shrinks as B grows (a
        # bigger decode workspace), the right side grows, so the condition holds up to the answer and fails after
        # it: bisect. (Iterating B <- usable(B) // per_short from above stops at the first fixed point below the
        # largest one: 3,891 instead of 3,924 for gpt2 at 24 GB, measured against the real maximum.)
        lo, hi = 1, max(1, usable_layer_blocks(1) // per_short)  # B = 1 is the floor; no B above hi can fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if usable_layer_blocks(mid) // per_short >= mid:
                lo = mid
            else:
                hi = mid - 1
        batch = lo
    ws = workspaces(batch)
    kv_budget = budget - fixed - max(w.total for w in ws)
    num_blocks = kv_budget // layout_1.bytes_per_block if kv_budget > 0 else 0
    if num_blocks < 2:
        cause = (
            f"lower max_num_seqs (--max-num-seqs) {o.max_num_seqs}, whose step workspace takes "
            f"{max(w.total for w in ws):,} B, or raise hbm (--hbm)"
            if o.max_num_seqs is not None and max(w.total for w in workspaces(1)) < budget - fixed - 2 * layout_1.bytes_per_block
            else "raise hbm (--hbm), utilization (--utilization) or tp (--tp), or use a smaller dtype (--dtype, "
            "--kv-dtype)"
        )
        raise PlanError(
            f"after {config.name}'s weights, workspace and reserve, {max(kv_budget, 0):,} B are left for the KV pool, "
            f"less than one {layout_1.bytes_per_block:,} B block: {cause}."
        )
    layout = BlockLayout(config, kv, o.block_size, int(num_blocks), tp=o.tp)
    plan = Plan(config, o, layout, budget, params, ws, reserve, batch, max_seq_len)

    lens = sorted(set(o.seq_lens)) if o.seq_lens else sorted({n for n in SEQ_LENS if n <= max_seq_len} | {max_seq_len})
    static_batch = plan.static_max_batch()
    by_seq_len = tuple(
        Limits(
            seq_len=n,
            paged=plan.max_batch(n),
            static=static_batch,
            blocks_per_seq=sequence_layer_blocks(config, n, o.block_size) / config.n_layer,
            fragmentation=expected_fragmentation(o.block_size, n, (n,) if o.seq_lens else None),
            static_waste=1 - n / max_seq_len,
        )
        for n in lens
    )
    by_batch = tuple(
        ContextLimit(b, _longest_context(plan, b), max_seq_len if b <= static_batch else 0) for b in BATCH_SIZES
    )
    return Plan(config, o, layout, budget, params, ws, reserve, batch, max_seq_len, by_seq_len, by_batch)


def step_workspaces(
    config: ModelConfig, o: PlanOptions, batch: int, max_seq_len: int
) -> tuple[StepWorkspace, ...]:
    """The workspaces of the largest steps at decode batch `batch`: the prefill step (its padded positions, with up to
    `batch` sequences' logits) and a decode step of `batch` rows; the activation term is the larger."""
    # padded positions: the budget rounded up, and at most `batch` rows (the engine's cap) of a padded chunk
    prefill_tokens = min(padded_prefill_tokens(o.prefill_chunk),
                         batch * padded_prefill_tokens(min(o.prefill_chunk, max_seq_len)))  # fmt: skip
    kv = o.kv_dtype or o.dtype
    ws = lambda *a: step_workspace(config, *a, weight_dtype_bytes(o.dtype), o.tp, o.naive_attention, kv)  # noqa: E731
    return (
        ws("prefill", prefill_tokens, min(batch, prefill_tokens), max_seq_len),
        ws("decode", batch, batch, max_seq_len),
    )


def short_sequence(config: ModelConfig, o: PlanOptions, max_seq_len: int) -> tuple[int, int]:
    """(shortest listed length, one-layer blocks one sequence of it holds): the length max_num_seqs is priced at."""
    shortest = min(SEQ_LENS[0], max_seq_len)
    return shortest, sequence_layer_blocks(config, shortest, o.block_size)


def _longest_context(plan: Plan, batch: int) -> int:
    """Longest length every one of `batch` concurrent sequences can reach together in the paged pool."""
    if batch > plan.max_num_seqs:
        return 0
    bs, capacity = plan.layout.block_size, plan.layer_blocks

    def fits(n: int) -> bool:
        return batch * sequence_layer_blocks(plan.config, n, bs) <= capacity

    lo, hi = 0, plan.max_seq_len  # fits(0); blocks held only grow with the length, so bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
