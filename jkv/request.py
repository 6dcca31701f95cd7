"""Requests, their sequences, and what the engine hands back (`RequestOutput`).

A request holds one prompt and its `SamplingParams`. It owns one sequence, or several when it forks: `n > 1`
parallel samples or `beam_width` beams, which share the prompt's KV blocks through the block manager.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from jkv.sampling import SamplingParams

UNKNOWN_TOKEN = -1  # async scheduling: a token slot whose token the device sampled but the host has not read


class TokenLogprobs(NamedTuple):
    """A token's log-probability and the most likely alternatives at its position (best first)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted by recomputation (blocks freed)
    RUNNING = "running"  # blocks on the device; prefilling or decoding
    SWAPPED = "swapped"  # preempted by swapping: blocks in host memory
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One token stream. `tokens` = prompt + generated; K/V of `tokens[:num_computed]` sit in the cache."""

    seq_id: int
    request: Request
    tokens: list[int]
    num_prompt: int
    sample_index: int = 0  # which of the request's n samples (seeds differ)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    pending: int | None = None  # a sampled token not yet given a slot (appended at the next schedule)
    inflight: bool = False  # a step that samples this sequence's next token(s) is dispatched and not read yet
    cum_logprob: float = 0.0  # beam search score
    finish_reason: str | None = None
    detok: object | None = None  # jkv.detokenizer.IncrementalDetokenizer: the output's text (stop strings, stream)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per output token, when the request asks

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def all_tokens(self) -> list[int]:
        """Tokens including a sampled one that has no slot yet."""
        return self.tokens if self.pending is None else [*self.tokens, self.pending]

    @property
    def num_output(self) -> int:
        return len(self.tokens) + (self.pending is not None) - self.num_prompt

    def output_ids(self) -> list[int]:
        """Generated tokens, a sampled one without a slot included (a fresh list, no copy of the prompt); the
        slots of a multi-step round still on the device (trailing placeholders) are left out."""
        out = self.tokens[self.num_prompt :]
        while out and out[-1] == UNKNOWN_TOKEN:
            out.pop()
        if self.pending is not None:
            out.append(self.pending)
        return out

    def has_output(self) -> bool:
        """Whether output_ids() would be non-empty, without building it (at least one generated token is known)."""
        if self.pending is not None:
            return True
        toks = self.tokens
        for i in range(self.num_prompt, len(toks)):  # placeholders trail: this returns at the first output token
            if toks[i] != UNKNOWN_TOKEN:
                return True
        return False

    def drop_placeholders(self) -> None:
        """Forget the trailing slots of tokens still on the device (an aborted sequence keeps what it has)."""
        while len(self.tokens) > self.num_prompt and self.tokens[-1] == UNKNOWN_TOKEN:
            self.tokens.pop()

    @property
    def prefilling(self) -> bool:
        return self.pending is None and not self.inflight and self.num_computed < len(self.tokens)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    arrival: int  # admission order (lower = higher priority)
    seqs: list[Sequence] = field(default_factory=list)
    finished_beams: list[tuple[float, list[int], str]] = field(default_factory=list)  # (score, tokens, why)
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per prompt token (first: None)
    num_preemptions: int = 0
    num_streamed: int = 0  # tokens of the first sample already reported in a RequestOutput's new_token_ids
    arrival_time: float = field(default_factory=time.monotonic)  # when add_request queued it
    scheduled_time: float | None = None  # when the scheduler first admitted it (its queueing ended)
    first_token_time: float | None = None  # when its first output token was first reported
    finish_time: float | None = None  # when it was first reported finished

    @property
    def seed(self) -> int:
        return self.sampling.seed if self.sampling.seed is not None else hash(self.request_id) & 0x7FFFFFFF

    @property
    def beam(self) -> bool:
        return self.sampling.beam_width > 1

    @property
    def finished(self) -> bool:
        """No sequence runs or waits, and none has a token still to be read from the device."""
        return self.error is not None or (
            bool(self.seqs) and all(s.status is SeqStatus.FINISHED and not s.inflight for s in self.seqs)
        )


@dataclass
class SampleOutput:
    """One of a request's n samples (or beams)."""

    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    score: float | None = None  # beam search: length-normalized log-probability
    logprobs: list[TokenLogprobs] | None = None  # per token, when the request asked for logprobs
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the sample


@dataclass(frozen=True)
class RequestMetrics:
    """A request's latency, as the caller of `Engine.step` sees it (`time.monotonic()` seconds).

    Times are taken when a step reports the token, so they include queueing, the host's work and, with
    async scheduling or multi-step decode, the wait for the device: a multi-step round reports its tokens
    together, so `time_per_output_token` is a mean over the request, not the gap between two tokens.
    """

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_output_tokens: int
    scheduled_time: float | None = None  # first admitted by the scheduler

    @property
    def queue_time(self) -> float | None:
        """Arrival to the first admission."""
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between output tokens after the first: (finish - first token) / (tokens - 1)."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def latency(self) -> float | None:
        """Arrival to finish."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    """A request's state after a step: all tokens generated so far, and the ones new in this step.

    `token_ids` / `text` are the first sample's (the best beam's); `samples` holds all n of them.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None
    samples: list[SampleOutput]
    error: str | None = None
    metrics: RequestMetrics | None = None  # set on every output the engine and `generate` return
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # when asked: per prompt token, the first None
