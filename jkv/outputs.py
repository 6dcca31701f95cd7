"""What an engine reports: each request's `RequestOutput` after a step (tokens, text, metrics) and the engine's
`EngineStats` snapshot.

The reporting fields of a request (`num_streamed`, `first_token_time`, `finish_time`) are written here and nowhere
else; everything else is read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jkv.block_manager import BlockManagerStats
from jkv.request import Request, RequestMetrics, RequestOutput, SampleOutput, Sequence


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine: its block manager's counters (`blocks`), the scheduler's queues and preemptions,
    tokens generated and compilations. The block figures users read most are properties over `blocks`."""

    step: int
    blocks: BlockManagerStats
    preemptions_recompute: int
    preemptions_swap: int
    running: int
    waiting: int
    swapped: int
    tokens_generated: int
    compilations: int  # XLA compilations this engine's calls caused
    history: list[dict] = field(default_factory=list, repr=False)

    @property
    def blocks_total(self) -> int:
        """Usable blocks (the null block excluded)."""
        return self.blocks.num_blocks

    @property
    def blocks_used(self) -> int:
        return self.blocks.num_used_blocks

    @property
    def blocks_free(self) -> int:
        return self.blocks.num_free_blocks

    @property
    def blocks_cached(self) -> int:
        """Free blocks still holding reusable prefix-cache content."""
        return self.blocks.num_cached_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.blocks.prefix_hit_rate

    @property
    def internal_fragmentation(self) -> float:
        """Allocated slots holding no token / allocated slots."""
        return self.blocks.internal_fragmentation

    @property
    def blocks_saved_by_sharing(self) -> int:
        return self.blocks.blocks_saved_by_sharing

    @property
    def swap_bytes(self) -> int:
        """Host <-> device bytes moved by swapping."""
        return self.blocks.swap_bytes_moved or 0

    def record(self) -> dict:
        """The snapshot as one flat history record (the block figures included)."""
        rec = {k: getattr(self, k) for k in ("step", "preemptions_recompute", "preemptions_swap", "running",
                                             "waiting", "swapped", "tokens_generated", "compilations",
                                             "blocks_total", "blocks_used", "blocks_free", "blocks_cached",
                                             "prefix_hit_rate", "internal_fragmentation", "blocks_saved_by_sharing",
                                             "swap_bytes")}  # fmt: skip
        return rec


class OutputBuilder:
    """Builds `RequestOutput`s; `tokenizer` (or None) gives `.text` of finished samples."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def text(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    def report(self, requests: list[Request], finished_only: bool) -> list[RequestOutput]:
        """Outputs of `requests` in arrival order (finished_only: of the finished ones; the others' first-token
        times are stamped all the same, at the step that first reads the token)."""
        reqs = sorted(requests, key=lambda r: r.arrival)
        if finished_only:
            for req in reqs:
                if not req.finished and req.first_token_time is None:
                    stamp(req, bool(req.seqs) and req.seqs[0].has_output(), False)
            return [self.output(req) for req in reqs if req.finished]
        return [self.output(req) for req in reqs]

    def output(self, req: Request) -> RequestOutput:
        if req.error is not None:
            return RequestOutput(req.request_id, req.prompt, [], [], None, True, "error", [], error=req.error,
                                 metrics=metrics(req, 0, True))  # fmt: skip
        if req.beam:
            ranked = sorted(req.finished_beams, key=lambda x: -x[0])[: req.sampling.n]
            samples = [SampleOutput(t, None, why, score) for score, t, why in ranked]
            if not req.finished or not samples:  # running, or aborted before a beam finished: the best beam so far
                best = max(req.seqs, key=lambda s: s.cum_logprob) if req.seqs else None
                reason = "aborted" if req.finished else None
                samples = [SampleOutput(best.output_ids() if best else [], None, reason, None)]
            new = []
        else:
            samples = [self.sample(s, s.finish_reason is not None) for s in req.seqs]
            new = samples[0].token_ids[req.num_streamed :]  # the first sample's tokens since its last report
            req.num_streamed = len(samples[0].token_ids)
        finished = req.finished
        if finished:
            for smp in samples:
                if smp.text is None:
                    smp.text = self.text(smp.token_ids)
        head = samples[0] if samples else SampleOutput([], None, None)
        reason = head.finish_reason
        if finished and any(s.finish_reason == "aborted" for s in req.seqs):
            reason = "aborted"
        scored = req.sampling.prompt_logprobs is not None and len(req.prompt_logprobs) == len(req.prompt)
        prompt_lp = list(req.prompt_logprobs) if scored else None
        return RequestOutput(req.request_id, req.prompt, head.token_ids, new, head.text, finished, reason, samples,
                             metrics=metrics(req, len(head.token_ids), finished), prompt_logprobs=prompt_lp)  # fmt: skip

    @staticmethod
    def sample(s: Sequence, finished: bool) -> SampleOutput:
        """A sequence's sample: its tokens, its text so far when it is detokenized on the way (else None: the
        caller decodes it at the finish), its logprobs when asked, and what stopped it."""
        ids = s.output_ids()
        text, stop_reason = None, None
        if s.detok is not None:
            if finished:
                s.detok.flush()
            text = s.detok.visible_text(finished)
            stop_reason = s.detok.stop_reason
        if stop_reason is None and s.finish_reason == "stop" and ids and ids[-1] in s.request.sampling.stop_token_ids:
            stop_reason = ids[-1]
        logprobs = list(s.logprobs) if s.request.sampling.logprobs is not None else None
        return SampleOutput(ids, text, s.finish_reason, None, logprobs, stop_reason)


def stamp(req: Request, has_output: bool, finished: bool) -> None:
    """Stamp the first report of a first token and of the finish (a report: an output, or the step that read the
    token when step(finished_only=True) builds none)."""
    now = time.monotonic()
    if has_output and req.first_token_time is None:
        req.first_token_time = now
    if finished and req.finish_time is None:
        req.finish_time = now


def metrics(req: Request, num_output: int, finished: bool) -> RequestMetrics:
    """Stamp the request's times (`stamp`), then its latency so far."""
    stamp(req, num_output > 0, finished)
    return RequestMetrics(req.arrival_time, req.first_token_time, req.finish_time, num_output, req.scheduled_time)


def error_output(request_id: str, prompt: list[int], error: str) -> RequestOutput:
    """The output of a request refused before it was queued (bad input): finished, no tokens, `.error` set."""
    now = time.monotonic()
    return RequestOutput(request_id, prompt, [], [], None, True, "error", [], error=error,
                         metrics=RequestMetrics(now, None, now, 0))  # fmt: skip
