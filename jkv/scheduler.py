"""Continuous-batching scheduler: which sequences run in the next step, and what blocks move first.

Each round, in priority order (earlier arrival first):

1. Running requests whose sequences hold a sampled token get a slot for it (`append_slots`). When the pool is
   short, the lowest-priority running request is preempted -- by recomputation (its blocks are freed and it
   goes back to the front of the waiting queue) or by swapping (its blocks move to host memory) -- until the
   append fits; if the request itself is the lowest, it is the one preempted.
2. If nothing was preempted, swapped requests come back (`swap_in`) while blocks above the watermark allow.
3. Prefill: running sequences part-way through a chunked prefill continue, then waiting requests are admitted
   (FCFS, while blocks above the watermark and the token budget last); a long prompt is split into chunks of at
   most the step's prefill token budget, so prefill chunks run beside the decodes of the same step. A request
   counts its full width (n samples, beams) against max_num_seqs from admission on, though it forks later.
   Given the engine's padding rule (`padded_size`), chunks are added only while the padded prefill step
   (rows x longest chunk, rounded up) stays within `max_padded` positions: without it, one long chunk beside many
   short ones made a step of up to rows x longest positions, far beyond the budget the planner sized the
   workspace for.

The scheduler only talks to the `BlockManager`; the device copies it implies come back as an ordered op list
(swap-outs, swap-ins, copy-on-writes) that the engine performs before the model step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from jkv.block_manager import AllocStatus, BlockManager
from jkv.request import UNKNOWN_TOKEN, Request, Sequence, SeqStatus


@dataclass
class SchedulerOutput:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, start, num_tokens)
    ops: list[tuple[str, object]] = field(default_factory=list)  # ("swap_out", {dev: host}), ("swap_in", ...), ("cow", [(s, d)])
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(
        self,
        manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preemption_mode: str = "recompute",
        padded_size: Callable[[int, int], int] | None = None,
        max_padded: int | None = None,
    ) -> None:
        """padded_size(rows, longest chunk) -> the query positions the engine's prefill step of that many rows
        computes after padding; with it, a round's prefill takes chunks only while that stays within max_padded
        (a chunk is cut short to fit; the first chunk always fits when max_padded >= padded_size(1, budget))."""
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode={preemption_mode!r} must be 'recompute' or 'swap'.")
        if preemption_mode == "swap" and manager.swap_space.num_free_slots == 0:
            raise ValueError("preemption_mode='swap' needs swap space: pass swap_blocks > 0.")
        self.manager = manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        if (padded_size is None) != (max_padded is None):
            raise ValueError("padded_size and max_padded go together: pass both or neither.")
        self.padded_size = padded_size
        self.max_padded = max_padded
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_preempt_recompute = 0
        self.num_preempt_swap = 0
        self.rejected: list[Request] = []  # found never admissible this round; the engine reports them

    # Queue management -------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Drop a request from every queue and free its sequences' blocks (finished or aborted)."""
        for queue in (self.running, self.swapped):
            if request in queue:
                queue.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        for s in request.seqs:
            if s.status in (SeqStatus.RUNNING, SeqStatus.SWAPPED):
                self.manager.free(s.seq_id)
            s.status = SeqStatus.FINISHED if s.status is not SeqStatus.FINISHED else s.status

    def release_seq(self, seq: Sequence) -> None:
        """A finished or dropped sequence gives its blocks back; the request stays while others run."""
        if seq.status in (SeqStatus.RUNNING, SeqStatus.SWAPPED):
            self.manager.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def num_running_seqs(self) -> int:
        return sum(1 for r in self.running for s in r.seqs if s.status is SeqStatus.RUNNING)

    @staticmethod
    def _seats(request: Request) -> int:
        """Decode rows a request takes once it runs: its live sequences, or n / beam_width before it forks."""
        if len(request.seqs) == 1 and request.seqs[0].num_output == 0:
            return max(request.sampling.n, request.sampling.beam_width)
        return sum(1 for s in request.seqs if s.status is not SeqStatus.FINISHED)

    def _seats_taken(self) -> int:
        # NOTE: counting sequences alone let an n > 1 request admitted as one sequence fork past max_num_seqs
        # (a decode batch wider than the bucket the planner sized); a request holds its future width.
        return sum(self._seats(r) for r in self.running)

    # Preemption -------------------------------------------------------------------------------------------
    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        live = [s for s in request.seqs if s.status is SeqStatus.RUNNING]
        self.running.remove(request)
        request.num_preemptions += 1
        out.preempted.append(request)
        ids = [s.seq_id for s in live]
        if self.preemption_mode == "swap" and not any(s.prefilling for s in live) and self.manager.can_swap_out(*ids):
            out.ops.append(("swap_out", self.manager.swap_out(*ids)))
            for s in live:
                s.status = SeqStatus.SWAPPED
            self.swapped.append(request)
            self.num_preempt_swap += 1
            return
        # Recompute: free the blocks; the sequence's tokens (with its pending one) become its new prompt. A
        # token still in flight (async scheduling) joins them when the engine reads it; the request waits.
        for s in live:
            self.manager.free(s.seq_id)
            if s.pending is not None:
                s.tokens.append(s.pending)
                s.pending = None
            s.num_computed = 0
            s.status = SeqStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preempt_recompute += 1

    # Prefill step size -------------------------------------------------------------------------------------
    def _row_fits(self, out: SchedulerOutput) -> bool:
        """Whether the round's prefill can take one more row (of one token) within max_padded."""
        if self.padded_size is None or not out.prefill:
            return True
        longest = max(n for _, _, n in out.prefill)
        return self.padded_size(len(out.prefill) + 1, longest) <= self.max_padded

    def _chunk(self, out: SchedulerOutput, n: int) -> int:
        """The longest chunk of at most n tokens the round's prefill can add as a row within max_padded (call
        after _row_fits: a chunk no longer than the round's longest always fits, so the result is >= 1)."""
        if self.padded_size is None or not out.prefill:
            return n
        rows, longest = len(out.prefill) + 1, max(m for _, _, m in out.prefill)
        lo, hi = min(n, longest), n  # lo fits; find the largest fitting length in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.padded_size(rows, mid) <= self.max_padded else (lo, mid - 1)
        return lo

    # One round --------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        m = self.manager
        budget = self.max_num_batched_tokens

        # 1. slots for the sampled tokens of running requests, preempting from the back when short
        self.running.sort(key=lambda r: r.arrival)
        done: list[Request] = []
        i = 0
        while i < len(self.running):
            req = self.running[i]
            seqs = [s for s in req.seqs if s.status is SeqStatus.RUNNING
                    and (s.pending is not None or s.inflight is not None)]  # fmt: skip
            need = sum(m.num_blocks_to_append(s.seq_id, 1) for s in seqs)
            preempted_self = False
            while need > m.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    preempted_self = True
                    break
            if preempted_self:
                break
            for s in seqs:
                # a token in flight gets its slot now and its value when the engine reads it
                token = s.pending if s.pending is not None else UNKNOWN_TOKEN
                # advance=False: the engine marks tokens computed once their values are known (a multi-step
                # decode round still in flight leaves placeholders that must not enter the prefix cache)
                cow = m.append_slots(s.seq_id, [token], advance=False)
                if cow:
                    out.ops.append(("cow", cow))
                s.tokens.append(token)
                s.pending = None
                out.decode.append(s)
            done.append(req)
            i += 1

        # 2. swapped requests come back when nothing had to be preempted
        if not out.preempted:
            for req in sorted(self.swapped, key=lambda r: r.arrival):
                ids = [s.seq_id for s in req.seqs if s.status is SeqStatus.SWAPPED]
                if self._seats_taken() + self._seats(req) > self.max_num_seqs or not m.can_swap_in(*ids):
                    break
                out.ops.append(("swap_in", m.swap_in(*ids)))
                for s in req.seqs:
                    if s.status is SeqStatus.SWAPPED:
                        s.status = SeqStatus.RUNNING
                self.swapped.remove(req)
                self.running.append(req)

        # 3. prefill: continue chunked prefills, then admit waiting requests
        decoding = {id(s) for s in out.decode}
        for req in list(self.running):
            for s in req.seqs:
                if budget <= 0 or not self._row_fits(out):
                    break
                if s.status is SeqStatus.RUNNING and s.prefilling and id(s) not in decoding:
                    n = self._chunk(out, min(len(s.tokens) - s.num_computed, budget))
                    out.prefill.append((s, s.num_computed, n))
                    budget -= n
        while self.waiting and budget > 0 and not self.swapped and self._row_fits(out):
            req = self.waiting[0]
            seqs = [s for s in req.seqs if s.status is SeqStatus.WAITING]
            if self._seats_taken() + self._seats(req) > self.max_num_seqs:
                break
            if any(s.inflight is not None for s in seqs):
                break  # preempted this round with a token still in flight: its prompt is not complete yet
            needed = sum(-(-len(s.tokens) // m.block_size) for s in seqs)
            # NOTE: each sequence's check sees the whole free pool; the forks of a request preempted by
            # recomputation are allocated together, so they must fit together (upper bound: no prefix hits).
            group_short = len(seqs) > 1 and needed > m.num_free_blocks - m.watermark_blocks
            if group_short or any(m.allocation_status(s.tokens) is not AllocStatus.OK for s in seqs):
                if not self.running and not out.decode and needed > m.num_free_blocks:
                    # nothing running will free blocks: the request can never be admitted
                    req.error = (f"request {req.request_id} needs {needed} KV blocks but the pool has only "
                                 f"{m.num_free_blocks} free: lower max_tokens or the prompt, or give the engine more blocks.")  # fmt: skip
                    self.waiting.popleft()
                    self.rejected.append(req)
                    continue
                break
            self.waiting.popleft()
            for s in seqs:
                alloc = m.allocate_prompt(s.seq_id, s.tokens)
                s.num_computed = alloc.num_cached_tokens
                s.status = SeqStatus.RUNNING
                if budget > 0 and self._row_fits(out):  # else its prefill starts in a later round
                    n = self._chunk(out, min(len(s.tokens) - s.num_computed, budget))
                    out.prefill.append((s, s.num_computed, n))
                    budget -= n
            self.running.append(req)
        return out
