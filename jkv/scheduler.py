"""Continuous-batching scheduler: the only writer of request, sequence and block state.

An engine step is `schedule()` -> the model executor runs the `SchedulerOutput` -> `update_after_dispatch()` ->
`update_from_output()` with the tokens the executor read back. The scheduler talks to the `BlockManager`; the
executor only reads what the output names and hands back a `ModelRunnerOutput`.

Each round, in priority order (earlier arrival first):

1. Running requests whose sequences hold a sampled token (or one still on the device) get a slot for it. When the
   pool is short, the lowest-priority running request is preempted -- by recomputation (its blocks are freed and
   it goes back to the front of the waiting queue) or by swapping (its blocks move to host memory) -- until the
   append fits; if the request itself is the lowest, it is the one preempted.
2. If nothing was preempted, swapped requests come back while blocks above the watermark allow.
3. Prefill: running sequences part-way through a chunked prefill continue, then waiting requests are admitted
   (FCFS, while blocks above the watermark and the token budget last); a long prompt is split into chunks of at
   most the step's prefill token budget, so prefill chunks run beside the decodes of the same step. A request
   counts its full width (n samples, beams) against max_num_seqs from admission on, though it forks later.
   Chunks are added only while the padded prefill step (the shape policy's rows x chunk) stays within the
   positions the planner priced.
4. Multi-step decode (`decode_steps` K > 1): the decode rows get the slots of their next K - 1 tokens as
   lookahead placeholders, when no row is a beam and the pool has the blocks; else the round runs one step.

Async scheduling: a sequence whose token the device sampled but the host has not read gets its slot anyway (a
placeholder id, `UNKNOWN_TOKEN`); the executor feeds the row that token from the previous step's device buffer.
A step whose tokens the host needs before the next schedule (beam search; the first token of an `n > 1` request,
whose samples fork from its logits) is read within the same engine step (`SchedulerOutput.read_now`).
"""

from __future__ import annotations

import itertools
import time
from collections import deque

from jkv import forks
from jkv.block_manager import AllocStatus, BlockManager
from jkv.request import UNKNOWN_TOKEN, Request, Sequence, SeqStatus
from jkv.sampling import SamplingParams
from jkv.step_io import (  # noqa: F401 - the seams, re-exported
    BeamCandidates,
    BlockCopies,
    DecodeRow,
    ModelRunnerOutput,
    PrefillChunk,
    SampledRow,
    SchedulerOutput,
)
from kvspec.shapes import ShapePolicy


def wants_prompt_logprobs(s: Sequence) -> bool:
    """Whether s's prefill still has prompt tokens to score (echo with logprobs)."""
    req = s.request
    return req.sampling.prompt_logprobs is not None and len(req.prompt_logprobs) < s.num_prompt


def check_stop(token: int, num_output: int, sampling: SamplingParams) -> str | None:
    """Why a sequence ends with `token` as its `num_output`-th output token: 'stop', 'length', or None."""
    if not sampling.ignore_eos and token in sampling.stop_token_ids:
        return "stop"
    if num_output >= sampling.max_tokens:
        return "length"
    return None


class Scheduler:
    def __init__(
        self,
        manager: BlockManager,
        shapes: ShapePolicy,
        *,
        preemption_mode: str = "recompute",
        async_scheduling: bool = True,
        tokenizer=None,
        stream_text: bool = False,
    ) -> None:
        """tokenizer: detokenizes outputs for stop strings; stream_text: for every sequence (each output's text
        so far), not only those with stop strings."""
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode={preemption_mode!r} must be 'recompute' or 'swap'.")
        if preemption_mode == "swap" and manager.swap_space.num_free_slots == 0:
            raise ValueError("preemption_mode='swap' needs swap space: pass swap_blocks > 0.")
        self.manager = manager
        self.shapes = shapes
        self.max_num_seqs = shapes.max_num_seqs
        self.max_num_batched_tokens = shapes.max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.async_scheduling = async_scheduling
        self.tokenizer = tokenizer
        self.stream_text = stream_text and tokenizer is not None
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_preempt_recompute = 0
        self.num_preempt_swap = 0
        self.num_generated_tokens = 0
        self._finished: list[Request] = []  # rejected or aborted outside a round: the next round reports them
        self.num_rounds = 0
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count(1)

    # Requests ---------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> Request:
        """Queue a checked request (the engine validated the prompt and sampling)."""
        req = Request(request_id, prompt, sampling, next(self._arrivals))
        req.seqs.append(Sequence(self._new_seq_id(), req, list(prompt), len(prompt)))
        if sampling.prompt_logprobs is not None:
            req.prompt_logprobs.append(None)  # the first prompt token has no context to score it
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request: its blocks come back now, tokens still on the device are dropped, and the next round
        reports it finished ('aborted'). False when no unfinished request has that id."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        for s in req.seqs:
            if s.status is not SeqStatus.FINISHED or s.inflight:
                s.finish_reason = "aborted"
                s.inflight = False  # a token still in flight is dropped
                s.drop_placeholders()  # and so are the slots of a multi-step round in flight
        self.remove(req)
        self._finished.append(req)
        return True

    def remove(self, request: Request) -> None:
        """Drop a request from every queue and free its sequences' blocks (finished or aborted)."""
        for queue in (self.running, self.swapped):
            if request in queue:
                queue.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        for s in request.seqs:
            self.release_seq(s)
        if self.requests.get(request.request_id) is request:
            del self.requests[request.request_id]

    def release_seq(self, seq: Sequence) -> None:
        """A finished or dropped sequence gives its blocks back; the request stays while others run."""
        if seq.status in (SeqStatus.RUNNING, SeqStatus.SWAPPED):
            self.manager.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED

    def _new_seq_id(self) -> int:
        return next(self._seq_ids)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self._finished)

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
    def _preempt(self, request: Request, out: SchedulerOutput, swap_out: list[tuple[int, int]]) -> None:
        live = [s for s in request.seqs if s.status is SeqStatus.RUNNING]
        self.running.remove(request)
        request.num_preemptions += 1
        out.preempted.append(request)
        ids = [s.seq_id for s in live]
        if self.preemption_mode == "swap" and not any(s.prefilling for s in live) and self.manager.can_swap_out(*ids):
            swap_out += self.manager.swap_out(*ids).items()  # a block two victims share is copied for each
            for s in live:
                s.status = SeqStatus.SWAPPED
            self.swapped.append(request)
            self.num_preempt_swap += 1
            return
        # Recompute: free the blocks; the sequence's tokens (with its pending one) become its new prompt. A
        # token still in flight (async scheduling) joins them when it is read; the request waits for it.
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
        """Whether the round's prefill can take one more row (of one token) within the priced padded size."""
        if not out.prefill:
            return True
        longest = max(c.num_tokens for c in out.prefill)
        return self.shapes.prefill_positions(len(out.prefill) + 1, longest) <= self.shapes.max_prefill_positions

    def _chunk(self, out: SchedulerOutput, n: int) -> int:
        """The longest chunk of at most n tokens the round's prefill can add as a row within the priced size
        (call after _row_fits: a chunk no longer than the round's longest always fits, so the result is >= 1)."""
        if not out.prefill:
            return n
        rows, longest = len(out.prefill) + 1, max(c.num_tokens for c in out.prefill)
        lo, hi = min(n, longest), n  # lo fits; find the largest fitting length in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            fits = self.shapes.prefill_positions(rows, mid) <= self.shapes.max_prefill_positions
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return lo

    def _add_chunk(self, out: SchedulerOutput, s: Sequence, budget: int) -> int:
        """Add s's next prefill chunk to the round; returns the tokens it takes from the budget."""
        n = self._chunk(out, min(len(s.tokens) - s.num_computed, budget))
        samples = s.num_computed + n == len(s.tokens)
        req = s.request
        fork = samples and req.sampling.n > 1 and len(req.seqs) == 1 and s.num_output == 0
        scores = wants_prompt_logprobs(s) and s.num_computed < s.num_prompt - 1
        out.prefill.append(PrefillChunk(s, s.num_computed, n, samples, fork, scores))
        return n

    # One round --------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(self.num_rounds, finished=self._finished)
        self._finished = []
        self.num_rounds += 1
        m = self.manager
        budget = self.max_num_batched_tokens
        swap_out: list[tuple[int, int]] = []
        swap_in: list[tuple[int, int]] = []
        cow: list[tuple[int, int]] = []
        decode: list[Sequence] = []

        # 1. slots for the sampled tokens of running requests, preempting from the back when short
        self.running.sort(key=lambda r: r.arrival)
        i = 0
        while i < len(self.running):
            req = self.running[i]
            seqs = [s for s in req.seqs if s.status is SeqStatus.RUNNING and (s.pending is not None or s.inflight)]
            need = sum(m.num_blocks_to_append(s.seq_id, 1) for s in seqs)
            preempted_self = False
            while need > m.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim, out, swap_out)
                if victim is req:
                    preempted_self = True
                    break
            if preempted_self:
                break
            for s in seqs:
                # a token in flight gets its slot now and its value when it is read; its K/V are marked computed
                # once the value is known (update_after_dispatch)
                cow += m.append_slots(s.seq_id, 1)
                s.tokens.append(s.pending if s.pending is not None else UNKNOWN_TOKEN)
                s.pending = None
                decode.append(s)
            i += 1

        # 2. swapped requests come back when nothing had to be preempted
        if not out.preempted:
            for req in sorted(self.swapped, key=lambda r: r.arrival):
                ids = [s.seq_id for s in req.seqs if s.status is SeqStatus.SWAPPED]
                if self._seats_taken() + self._seats(req) > self.max_num_seqs or not m.can_swap_in(*ids):
                    break
                swap_in += m.swap_in(*ids).items()
                for s in req.seqs:
                    if s.status is SeqStatus.SWAPPED:
                        s.status = SeqStatus.RUNNING
                self.swapped.remove(req)
                self.running.append(req)

        # 3. prefill: continue chunked prefills, then admit waiting requests
        decoding = {id(s) for s in decode}
        for req in list(self.running):
            for s in req.seqs:
                if budget <= 0 or not self._row_fits(out):
                    break
                if s.status is SeqStatus.RUNNING and s.prefilling and id(s) not in decoding:
                    budget -= self._add_chunk(out, s, budget)
        while self.waiting and budget > 0 and not self.swapped and self._row_fits(out):
            req = self.waiting[0]
            seqs = [s for s in req.seqs if s.status is SeqStatus.WAITING]
            if self._seats_taken() + self._seats(req) > self.max_num_seqs:
                break
            if any(s.inflight for s in seqs):
                break  # preempted with a token still in flight: its prompt is not complete yet
            needed = sum(-(-len(s.tokens) // m.block_size) for s in seqs)
            # NOTE: each sequence's check sees the whole free pool; the forks of a request preempted by
            # recomputation are allocated together, so they must fit together (upper bound: no prefix hits).
            group_short = len(seqs) > 1 and needed > m.num_free_blocks - m.watermark_blocks
            if group_short or any(m.allocation_status(s.tokens) is not AllocStatus.OK for s in seqs):
                if not self.running and not decode and needed > m.num_free_blocks:
                    # nothing running will free blocks: the request can never be admitted
                    req.error = (f"request {req.request_id} needs {needed} KV blocks but the pool has only "
                                 f"{m.num_free_blocks} free: lower max_tokens or the prompt, or give the engine "
                                 "more blocks.")  # fmt: skip
                    self.waiting.popleft()
                    self.remove(req)
                    out.finished.append(req)
                    continue
                break
            self.waiting.popleft()
            if req.scheduled_time is None:
                req.scheduled_time = time.monotonic()
            for s in seqs:
                # a request scoring its prompt computes every prompt position: a prefix hit would skip some
                keys = ("prompt_logprobs", req.request_id) if wants_prompt_logprobs(s) else ()
                alloc = m.allocate_prompt(s.seq_id, s.tokens, extra_keys=keys)
                s.num_computed = alloc.num_cached_tokens
                s.status = SeqStatus.RUNNING
                if budget > 0 and self._row_fits(out):  # else its prefill starts in a later round
                    budget -= self._add_chunk(out, s, budget)
            self.running.append(req)

        # 4. the decode rows' lookahead slots for a multi-step round
        counts = self._lookahead(decode)
        out.multi_step = counts is not None
        for k, s in enumerate(decode):
            n = counts[k] if counts else 1
            out.decode.append(DecodeRow(s, len(s.tokens) - n + 1, n))
        out.copies = BlockCopies(swap_out, swap_in, cow)
        out.read_now = (not self.async_scheduling or any(s.request.beam for s in decode)
                        or any(c.samples and (c.forks or c.seq.request.beam) for c in out.prefill))  # fmt: skip
        return out

    def _lookahead(self, seqs: list[Sequence]) -> list[int] | None:
        """Multi-step decode: tokens each decode row samples this round, after giving every row the slots of its
        extra steps (placeholders); None for a single step (decode_steps 1, beam search, or too few free
        blocks for the extra slots)."""
        k = self.shapes.decode_steps
        # NOTE: a multi-step round keeps no logits, so a row that reports logprobs makes it a single step
        if k == 1 or not seqs or any(s.request.beam or s.request.sampling.logprobs is not None for s in seqs):
            return None
        m = self.manager
        # the row's input token is already in s.tokens; it may sample up to max_tokens
        counts = [min(k, s.request.sampling.max_tokens - s.num_output) for s in seqs]
        need = sum(m.num_blocks_to_append(s.seq_id, n - 1) for s, n in zip(seqs, counts))
        if max(counts) == 1 or need > m.num_free_blocks:
            return None
        for s, n in zip(seqs, counts):
            if n > 1:
                assert not m.append_slots(s.seq_id, n - 1), "the round's first slot already made the last block private"
                s.tokens.extend([UNKNOWN_TOKEN] * (n - 1))
        return counts

    # After the executor ---------------------------------------------------------------------------------------
    def update_after_dispatch(self, out: SchedulerOutput) -> None:
        """The round is on the device (and the round before it was read): record what it computes, mark its
        sampling rows in flight, and -- when its tokens are read later -- give back now the blocks of sequences
        whose token in flight is their last (max_tokens), so the next schedule sees the blocks a synchronous
        engine would."""
        m = self.manager
        for row in out.decode:
            s = row.seq
            if s.status is SeqStatus.FINISHED:  # stopped by the token the previous round sampled
                continue
            s.num_computed = len(s.tokens)
            # the input token is known now (prefix-cache hashes need its value); a round's placeholders are not
            m.mark_computed(s.seq_id, row.start, s.tokens)
            s.inflight = True
        for c in out.prefill:
            s = c.seq
            s.num_computed = c.start + c.num_tokens
            m.mark_computed(s.seq_id, s.num_computed, s.tokens)
            s.inflight = c.samples
        if out.read_now:
            return
        for s in [r.seq for r in out.decode] + [c.seq for c in out.prefill if c.samples]:
            if s.inflight and s.num_output + 1 >= s.request.sampling.max_tokens:
                self.release_seq(s)
                req = s.request
                if all(q.status is SeqStatus.FINISHED for q in req.seqs):
                    self.remove(req)

    def update_from_output(self, result: ModelRunnerOutput | None) -> dict[str, Request]:
        """Take the tokens a round sampled: place them, fork samples, pick beams, stop sequences, free finished
        requests. Returns the requests concerned, by id."""
        touched: dict[str, Request] = {}
        if result is None:
            return touched
        ended: list[Request] = []
        for row in result.rows:
            s = row.seq
            if not s.inflight:  # aborted, or stopped by an earlier token, since the round was dispatched
                continue
            s.inflight = False
            req = s.request
            touched[req.request_id] = req
            if row.fork_tokens is not None:  # the samples fork from the placed first token, then each is checked
                self._place(s, row.start, row.tokens[0])
                children = forks.fork_samples(self, s, row.fork_tokens)
                lps = [row.logprobs, *([lp] for lp in row.fork_logprobs)] if row.logprobs else [None] * (1 + len(children))
                for q, lp in zip([s, *children], lps):
                    if self._take(q, len(q.tokens), [q.pending], lp):
                        ended.append(req)
            elif self._take(s, row.start, row.tokens, row.logprobs):
                ended.append(req)
        for req, first, entries in result.prompt_logprobs:
            have = req.prompt_logprobs  # scores land in prompt order; a chunk scored again adds nothing
            have.extend(entries[len(have) - first :] if first <= len(have) else [])
        for cand in result.beams:
            live = [b for b in cand.beams if b.inflight]
            if not live:
                continue
            assert len(live) == len(cand.beams), "a beam request's beams are read together"
            for b in live:
                b.inflight = False
            touched[cand.request.request_id] = cand.request
            self.num_generated_tokens += forks.beam_step(self, cand)
            ended.append(cand.request)
        for req in ended:
            if req.finished:
                self.remove(req)
        return touched

    def _place(self, s: Sequence, index: int, token: int) -> None:
        """Put a sampled token where it belongs, by the sequence's state since the round was dispatched: into its
        slot at `index` when it has one (the next round or a multi-step round already gave it one), else as the
        pending token of a live sequence, else at the end (preempted by recomputation: its tokens become its
        prompt; or released at max_tokens)."""
        if index < len(s.tokens):
            s.tokens[index] = token
        elif s.status is SeqStatus.RUNNING or s.status is SeqStatus.SWAPPED:
            s.pending = token  # gets a slot at the next schedule
        else:
            s.tokens.append(token)

    def _take(self, s: Sequence, start: int, tokens: list[int], logprobs: list | None = None) -> bool:
        """Place s's sampled tokens (index start on), counting each and stopping at a stop token, a stop string
        or max_tokens; the slots after the stop are dropped. `logprobs`: each token's, kept beside the token.
        Returns whether s finished."""
        sp = s.request.sampling
        detok = self._detokenizer(s, start) if sp.stop or self.stream_text else None
        # The leading tokens that have slots and end nothing go in as one slice (a multi-step round's tokens into
        # its placeholder slots: what the loop below does token by token); the loop takes the rest.
        live = s.status is SeqStatus.RUNNING or s.status is SeqStatus.SWAPPED
        m = min(len(tokens), len(s.tokens) - start) if live else 0
        if (m > 1 and start + m - s.num_prompt < sp.max_tokens
                and (sp.ignore_eos or not any(t in sp.stop_token_ids for t in tokens[:m])) and not sp.stop):  # fmt: skip
            s.tokens[start : start + m] = tokens[:m]
            self.num_generated_tokens += m
            if detok is not None:
                detok.feed_many(tokens[:m])
            if logprobs:
                s.logprobs.extend(logprobs[:m])
        else:
            m = 0
        for j in range(m, len(tokens)):
            token, index = tokens[j], start + j
            self._place(s, index, token)
            self.num_generated_tokens += 1
            if logprobs:
                s.logprobs.append(logprobs[j])
            why = check_stop(token, index + 1 - s.num_prompt, sp)
            if detok is not None and detok.feed(token) and why != "stop":
                why = "stop"  # a stop string completed: it ends the sequence like a stop token
            if s.status is SeqStatus.FINISHED:  # released ahead of its last token (by length)
                if why == "stop" or j == len(tokens) - 1:
                    del s.tokens[index + 1 :]
                    s.finish_reason = "stop" if why == "stop" else "length"
                    return True
                continue
            if why is not None:
                if s.pending is not None:
                    s.tokens.append(s.pending)
                    s.pending = None
                del s.tokens[index + 1 :]  # placeholders of steps past the stop (multi-step, async)
                s.finish_reason = why
                self.release_seq(s)
                return True
        return False

    def _detokenizer(self, s: Sequence, start: int):
        """s's incremental detokenizer, made on first use and given the output tokens before index `start`
        (forks and beams start from their parent's)."""
        if s.detok is None:
            from jkv.detokenizer import IncrementalDetokenizer

            s.detok = IncrementalDetokenizer(self.tokenizer, s.request.sampling.stop)
            s.detok.feed_many(s.tokens[s.num_prompt : start])
        return s.detok
