"""The model executor: runs what the scheduler decided on the device and hands back what the device sampled.

It owns the device side of an engine: the KV cache (pools, swap space, block copies), the step runner (jitted
steps) and the token buffer threaded through the steps. `execute(schedule)` performs the round's block copies,
dispatches its decode and prefill calls without waiting for the device, then reads the round dispatched before it
(async scheduling: the host's bookkeeping of round n - 1 overlaps the device's work on round n) and returns that
one's `ModelRunnerOutput`; `wait()` reads the round just dispatched. It reads sequences and block tables and
writes none of them: the scheduler is the only writer of that state.

A decode row whose input token the host has not read yet (`UNKNOWN_TOKEN`) takes it on the device from the
previous round's token buffer: decode rows sit at [0, B) of that buffer (a multi-step round leaves each row's
last token there), prefill rows from token_slots / 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import numpy as np

from jkv.forks import BeamCandidates, beam_candidates, fork_first_tokens, mix_seed
from jkv.kv_cache import KVCache
from jkv.request import UNKNOWN_TOKEN, Sequence, TokenLogprobs
from jkv.runner import StepRow, StepRunner, build_inputs, pack
from jkv.sampling import token_logprobs
from jkv.step_io import ModelRunnerOutput, PrefillChunk, SampledRow, SchedulerOutput
from kvspec.shapes import ShapePolicy, StepShape


@dataclass
class _Part:
    """The rows of one device call (decode or prefill) that sample tokens."""

    seqs: list[Sequence]
    slots: list[int]  # each row's place in the round's token buffer
    starts: list[int]  # per row: the index in seq.tokens its (first) sampled token belongs at
    logits: jax.Array | None  # [B, V] on the device, row = slot - offset (None: the host needs no logits)
    offset: int
    steps: jax.Array | None = None  # multi-step decode: the sampled tokens [K, B]; row b's first counts[b]
    counts: list[int] | None = None
    forks: list[bool] | None = None  # prefill: rows whose token is the first of an `n > 1` request
    logprobs: tuple | None = None  # the sampled tokens' (log-prob [B], top values [B, K], top ids [B, K])


@dataclass
class _Scores:
    """A prefill call's prompt scores (echo with logprobs): the chunks that asked, by row, and the device's
    (log-prob [B, C], top values [B, C, K], top ids [B, C, K])."""

    chunks: list[tuple[int, PrefillChunk]]
    scored: tuple


@dataclass
class _Flight:
    """A dispatched round: its token buffer on the device and the rows that sample into it."""

    step: int
    tokens: jax.Array  # int32 [token_slots]
    parts: list[_Part]
    scores: _Scores | None = None

    def slot_of(self) -> dict[int, int]:
        """Buffer slot of each sampling sequence's (last) token, by seq_id."""
        return {s.seq_id: i for p in self.parts for s, i in zip(p.seqs, p.slots)}


def _sampling(s: Sequence, at: int) -> tuple[float, int, float, int, int]:
    """Sampling parameters of s's token at index `at`: temperature, top_k, top_p, seed, counter."""
    sp = s.request.sampling
    return float(sp.temperature), int(sp.top_k), float(sp.top_p), mix_seed(s.request.seed, s.sample_index), at - s.num_prompt


def _logprobs(seqs: list[Sequence], logits: jax.Array, tokens: jax.Array) -> tuple | None:
    """The sampled tokens' log-probabilities on the device (dispatched, not read), when a row asks for them."""
    if not any(s.request.sampling.logprobs is not None for s in seqs):
        return None
    return token_logprobs(logits, tokens)


def _entry(logprob, top_values, top_ids, k: int) -> TokenLogprobs:
    return TokenLogprobs(float(logprob), top_ids[:k].tolist(), top_values[:k].tolist())


def _prompt_targets(chunks: list[PrefillChunk], rows: int, chunk: int) -> np.ndarray:
    """Per prefill row and position, the prompt token that follows it when the chunk scores its prompt, else -1."""
    targets = np.full((rows, chunk), -1, np.int32)
    for r, c in enumerate(chunks):
        if c.prompt_logprobs:
            s = c.seq
            nxt = s.tokens[c.start + 1 : min(c.start + c.num_tokens + 1, s.num_prompt)]
            targets[r, : len(nxt)] = nxt
    return targets


def _prompt_scores(scores: _Scores | None) -> list:
    """(request, first prompt index scored, entries) per chunk that scored its prompt."""
    if scores is None:
        return []
    chosen, top_v, top_i = (np.asarray(a) for a in scores.scored)
    out = []
    for r, c in scores.chunks:
        req = c.seq.request
        n = min(c.start + c.num_tokens + 1, c.seq.num_prompt) - (c.start + 1)
        k = req.sampling.prompt_logprobs
        out.append((req, c.start + 1, [_entry(chosen[r, j], top_v[r, j], top_i[r, j], k) for j in range(n)]))
    return out


class ModelExecutor:
    """Dispatches scheduled rounds over one KV cache and step runner; see the module docstring."""

    def __init__(self, runner: StepRunner, kv: KVCache, shapes: ShapePolicy, block_tables) -> None:
        """block_tables(seq_id) -> the sequence's current block table (read only)."""
        self.runner = runner
        self.kv = kv
        self.shapes = shapes
        self._block_table = block_tables
        self._tokens = runner.zero_tokens()  # the last dispatched round's token buffer (on the device)
        self._flight: _Flight | None = None  # dispatched, not read yet
        self.events: list[tuple[str, int]] | None = None  # a list: ("dispatch" | "read", step) logged there
        self.last_decode_rows = 0
        self.last_decode_steps = 0  # decode steps the last round ran on the device (K in a multi-step round)

    @property
    def busy(self) -> bool:
        """Whether a dispatched round is still unread."""
        return self._flight is not None

    # One round ----------------------------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """Copy the round's blocks, dispatch its steps, then read the previous round; that round's output."""
        copies = sched.copies
        if copies.swap_out:
            self.kv.swap_out(copies.swap_out)
        if copies.swap_in:
            self.kv.swap_in(copies.swap_in)
        if copies.cow:
            self.kv.copy(copies.cow)
        prev, self._flight = self._flight, None
        self._flight = self._dispatch(sched, prev)
        return self._land(prev) if prev is not None else None

    def wait(self) -> ModelRunnerOutput | None:
        """Read the round just dispatched (the host needs its tokens before the next schedule)."""
        flight, self._flight = self._flight, None
        return self._land(flight) if flight is not None else None

    def _dispatch(self, sched: SchedulerOutput, prev: _Flight | None) -> _Flight | None:
        bs, buf, parts, runner, scores = self.shapes.block_size, self._tokens, [], self.runner, None
        self.last_decode_rows = len(sched.decode)
        self.last_decode_steps = max((r.num_steps for r in sched.decode), default=0)
        if sched.decode:
            seqs = [r.seq for r in sched.decode]
            starts = [r.start for r in sched.decode]
            b = self.shapes.rows(len(seqs))
            rows = [StepRow([s.tokens[p - 1]], p - 1, self._block_table(s.seq_id), *_sampling(s, p))
                    for s, p in zip(seqs, starts)]  # fmt: skip
            slot = prev.slot_of() if prev is not None else {}
            src = [-1 if s.tokens[p - 1] != UNKNOWN_TOKEN else slot[s.seq_id] for s, p in zip(seqs, starts)]
            width = self.shapes.width(max(len(s.tokens) for s in seqs))
            x = build_inputs(rows, block_size=bs, chunk=1, width=width, batch=b, src_rows=src)
            greedy = all(s.request.sampling.greedy for s in seqs)
            if sched.multi_step:
                counts = [r.num_steps for r in sched.decode]
                x = dataclasses.replace(x, query_lens=np.asarray(counts + [0] * (b - len(seqs)), np.int32))
                steps, self.kv.pools, buf = runner.run_decode_steps(self.kv.pools, x, buf,
                                                                    num_steps=self.shapes.decode_steps, greedy=greedy)  # fmt: skip
                parts.append(_Part(seqs, list(range(len(seqs))), starts, None, 0, steps, counts))
            else:
                toks, logits, self.kv.pools, buf = runner.run_step(self.kv.pools, x, buf, decode=True, greedy=greedy)
                parts.append(_Part(seqs, list(range(len(seqs))), starts, logits, 0, logprobs=_logprobs(seqs, logits, toks)))
        if sched.prefill:
            chunks = sched.prefill
            b = self.shapes.rows(len(chunks))
            chunk = self.shapes.prefill_chunk(max(c.num_tokens for c in chunks))
            width = self.shapes.prefill_width(max(c.start + c.num_tokens for c in chunks))
            rows = [StepRow(c.seq.tokens[c.start : c.start + c.num_tokens], c.start,
                            self._block_table(c.seq.seq_id)[:width], *_sampling(c.seq, len(c.seq.tokens)))
                    for c in chunks]  # fmt: skip
            x = build_inputs(rows, block_size=bs, chunk=chunk, width=width, batch=b)
            greedy = all(c.seq.request.sampling.greedy for c in chunks)
            if any(c.prompt_logprobs for c in chunks):
                toks, logits, self.kv.pools, buf, scored = runner.run_scoring_step(
                    self.kv.pools, x, buf, _prompt_targets(chunks, b, chunk), greedy=greedy)  # fmt: skip
                scores = _Scores([(r, c) for r, c in enumerate(chunks) if c.prompt_logprobs], scored)
            else:
                toks, logits, self.kv.pools, buf = runner.run_step(self.kv.pools, x, buf, decode=False, greedy=greedy)
            half = runner.token_slots // 2
            done = [(r, c) for r, c in enumerate(chunks) if c.samples]
            if done:
                lp = _logprobs([c.seq for c in chunks], logits, toks)
                parts.append(_Part([c.seq for _, c in done], [half + r for r, _ in done],
                                   [len(c.seq.tokens) for _, c in done], logits, half,
                                   forks=[c.forks for _, c in done], logprobs=lp))  # fmt: skip
        self._tokens = buf
        if scores is not None:
            for a in scores.scored:
                a.copy_to_host_async()
        if not parts and scores is None:
            return None
        if self.events is not None:
            self.events.append(("dispatch", sched.step))
        read = runner.tp.local(buf)  # the copy the host reads (under jax.distributed, this process's replica)
        if not sched.read_now:
            for part in parts:
                part.logits = None  # the host needs none: keep no [B, V] array alive for a round longer
                if part.steps is not None:
                    part.steps.copy_to_host_async()
                for a in part.logprobs or ():
                    a.copy_to_host_async()
            read.copy_to_host_async()  # queued right behind this round, not behind the next one
        return _Flight(sched.step, read, parts, scores)

    def _land(self, flight: _Flight) -> ModelRunnerOutput:
        """Read a dispatched round's sampled tokens (one device->host copy per kind of part)."""
        if self.events is not None:
            self.events.append(("read", flight.step))
        values = np.asarray(flight.tokens).tolist() if any(p.steps is None for p in flight.parts) else None
        rows: list[SampledRow] = []
        beams: dict[str, tuple[list[Sequence], list[int], _Part]] = {}
        for part in flight.parts:
            steps = np.asarray(part.steps).T.tolist() if part.steps is not None else None
            lp = [np.asarray(a) for a in part.logprobs] if part.logprobs is not None else None
            for k, (s, i, start) in enumerate(zip(part.seqs, part.slots, part.starts)):
                if not s.inflight:  # aborted or stopped since dispatch: nothing to read for it
                    continue
                req = s.request
                k_top, row = req.sampling.logprobs, i - part.offset
                mine = [_entry(lp[0][row], lp[1][row], lp[2][row], k_top)] if lp and k_top is not None else None
                if req.beam:
                    beams.setdefault(req.request_id, ([], [], part))[0].append(s)
                    beams[req.request_id][1].append(row)
                elif steps is not None:
                    rows.append(SampledRow(s, start, steps[i][: part.counts[k]]))
                elif part.forks is not None and part.forks[k]:
                    first = fork_first_tokens(req, part.logits[row], values[i])
                    fork_lp = None
                    if mine:  # the forks' first tokens come from the same distribution as this row's token
                        logp = np.asarray(jax.nn.log_softmax(part.logits[row]))
                        fork_lp = [mine[0]._replace(logprob=float(logp[t])) for t in first]
                    rows.append(SampledRow(s, start, [values[i]], first, mine, fork_lp))
                else:
                    rows.append(SampledRow(s, start, [values[i]], None, mine))
        cands: list[BeamCandidates] = []
        for seqs, idx, part in beams.values():
            cands.append(beam_candidates(seqs[0].request, seqs, part.logits[np.asarray(idx)]))
        return ModelRunnerOutput(flight.step, rows, cands, _prompt_scores(flight.scores))

    # Padding-only steps (warm-up) --------------------------------------------------------------------------------
    # A padding-only step attends over nothing and writes only the null block: the pools' contents are untouched,
    # and XLA compiles and autotunes the step exactly as a real one of that shape.
    def _padding(self, shape: StepShape):
        x = build_inputs([], block_size=self.shapes.block_size, chunk=shape.chunk, width=shape.width, batch=shape.rows)
        call = {"decode": shape.kind != "prefill", "greedy": shape.greedy,
                "num_steps": self.shapes.decode_steps if shape.kind == "steps" else None}  # fmt: skip
        return x, call

    def is_compiled(self, shape: StepShape) -> bool:
        x, call = self._padding(shape)
        return self.runner.is_compiled(x, **call)

    def padding_compiler(self, shape: StepShape):
        """(stored step function, its arguments) of a padding-only step of `shape`, for `fn.precompile(*args)`."""
        x, call = self._padding(shape)
        ints, floats = self.runner.tp.inputs(*pack(x))
        return self.runner.function(x, **call), (self.runner.params, self.kv.pools, ints, floats, self._tokens)

    def run_padding(self, shape: StepShape) -> None:
        """Run a padding-only step of `shape` (compiling it if needed)."""
        x, call = self._padding(shape)
        r = self.runner
        if call["num_steps"] is not None:
            _, self.kv.pools, self._tokens = r.run_decode_steps(self.kv.pools, x, self._tokens,
                                                                num_steps=call["num_steps"], greedy=call["greedy"])  # fmt: skip
        else:
            _, _, self.kv.pools, self._tokens = r.run_step(self.kv.pools, x, self._tokens, decode=call["decode"],
                                                           greedy=call["greedy"])  # fmt: skip

    def replay(self, op: str, statics: tuple[int, ...], arrays: list[np.ndarray]) -> None:
        """Under jax.distributed, on a process other than 0: the device call process 0 announced (a step or a
        block copy), on this process's shards of the pools and the token buffer."""
        if op == "copy":
            self.kv.copy_arrays(*arrays)
        else:
            self.kv.pools, self._tokens = self.runner.replay(op, statics, arrays, self.kv.pools, self._tokens)

    # Lifecycle ----------------------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Block until nothing this executor launched is still running or copying on the device."""
        arrays = [self.kv.pools]
        if self._flight is not None:
            arrays += [self._flight.tokens, *(p.steps for p in self._flight.parts if p.steps is not None)]
        jax.block_until_ready(arrays)
        jax.effects_barrier()

    def close(self) -> None:
        """Drop the round in flight and free the pools and the token buffer now."""
        self._flight = None
        self.kv.close()
        if self._tokens is not None and not self._tokens.is_deleted():
            self._tokens.delete()
        self._tokens = None
        self.runner.close()
