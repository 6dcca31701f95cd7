"""The typed seams of an engine step: what the scheduler hands the model executor (`SchedulerOutput`, its
`DecodeRow`s, `PrefillChunk`s and `BlockCopies`) and what the executor hands back (`ModelRunnerOutput`: each row's
`SampledRow`, and `BeamCandidates` for beam search). Plain data: no behaviour, no device arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jkv.forks import BeamCandidates
from jkv.request import Request, Sequence, TokenLogprobs

__all__ = ["BeamCandidates", "BlockCopies", "DecodeRow", "ModelRunnerOutput", "PrefillChunk", "SampledRow",
           "SchedulerOutput"]


@dataclass(frozen=True)
class BlockCopies:
    """Device copies a round needs before its model step, applied in this order: swap-outs (device block -> host
    slot), swap-ins (host slot -> device block), copy-on-writes (source block -> destination block).

    NOTE: the block manager allows per-kind batching only when a round runs all swap-outs, then all swap-ins, then
    all copy-on-writes, and swaps out no sequence it appended to or swapped in the same round; `schedule` keeps
    that: victims are taken from the back of the running queue before their turn to append, and swap-ins run only
    in rounds that preempted nothing.
    """

    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host slot)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host slot, device block)
    cow: list[tuple[int, int]] = field(default_factory=list)  # (source block, destination block)

    def __bool__(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.cow)


@dataclass(frozen=True)
class DecodeRow:
    """A decode row: `seq`'s tokens from index `start` are sampled this round (`num_steps` of them, 1 unless the
    round is multi-step); its input token is `seq.tokens[start - 1]`."""

    seq: Sequence
    start: int
    num_steps: int = 1


@dataclass(frozen=True)
class PrefillChunk:
    """Tokens [start, start + num_tokens) of `seq` computed this round; `samples`: the chunk completes the prompt
    and its last row samples the first token; `forks`: that token is the first of an `n > 1` request."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool
    forks: bool = False
    prompt_logprobs: bool = False  # the step also scores the chunk's next prompt tokens (echo with logprobs)


@dataclass
class SchedulerOutput:
    """What one round runs: decode rows, prefill chunks, the block copies before them, and what it reports."""

    step: int
    decode: list[DecodeRow] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    copies: BlockCopies = field(default_factory=BlockCopies)
    multi_step: bool = False  # the decode rows run a multi-step round (DecodeRow.num_steps)
    read_now: bool = False  # the host needs this round's tokens before the next schedule
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # rejected or aborted since the last round

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass(frozen=True)
class SampledRow:
    """Tokens a row sampled, which belong at `seq.tokens[start:]`; `fork_tokens`: the first tokens of the other
    n - 1 samples of an `n > 1` request (sampled from the same logits)."""

    seq: Sequence
    start: int
    tokens: list[int]
    fork_tokens: list[int] | None = None
    logprobs: list[TokenLogprobs] | None = None  # per token, when the request asks for logprobs
    fork_logprobs: list[TokenLogprobs] | None = None  # the fork tokens' (same request)


@dataclass(frozen=True)
class ModelRunnerOutput:
    """What the executor read back from one dispatched round."""

    step: int
    rows: list[SampledRow] = field(default_factory=list)
    beams: list[BeamCandidates] = field(default_factory=list)
    # echo with logprobs: (request, index of the first prompt token scored, its entries in prompt order)
    prompt_logprobs: list[tuple[Request, int, list[TokenLogprobs]]] = field(default_factory=list)
