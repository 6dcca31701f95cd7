"""Parallel sampling (`n > 1`) and beam search: the device math that picks forked samples' first tokens and the
beams' continuations (called by the model executor on a round's logits), and the state changes the scheduler
applies with them (`fork_samples`, `beam_step`).

An `n > 1` request runs as one sequence through its prompt; the logits of its first sampled token give the other
n - 1 samples their first tokens, each with its own seed, and the samples then share the prompt's blocks
(copy-on-write). A beam request keeps `beam_width` sequences; each round scores every beam's continuations by
cumulative log-probability and keeps the best `beam_width`, finished beams (a stop token, or max_tokens) ranked by
score / length ** length_penalty.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jkv.request import Request, Sequence, SeqStatus
from jkv.sampling import sample_tokens

if TYPE_CHECKING:
    from jkv.scheduler import Scheduler


def mix_seed(seed: int, index: int) -> int:
    """The sampling seed of sample `index` of a request seeded `seed`."""
    return (seed * 1_000_003 + index * 7919) & 0xFFFFFFFF


@dataclass(frozen=True)
class BeamCandidates:
    """The best 2 x beam_width continuations over a beam request's beams: score, parent beam index, token."""

    request: Request
    beams: list[Sequence]
    scores: list[float]
    parents: list[int]
    tokens: list[int]


# Device math (model executor) ---------------------------------------------------------------------------------
@jax.jit
def _sample_many(logits_row, temperature, top_k, top_p, seeds, counters):
    n = seeds.shape[0]
    rows = jnp.broadcast_to(logits_row, (n, logits_row.shape[-1]))
    return sample_tokens(rows, temperature, top_k, top_p, seeds, counters)


@partial(jax.jit, static_argnums=2)
def _top_candidates(logits: jax.Array, cum: jax.Array, k: int):
    """Top-k (score, beam, token) over all beams' continuations: score = cum + log p."""
    logp = jax.nn.log_softmax(logits, axis=-1) + cum[:, None]  # [W, V]
    scores, flat = jax.lax.top_k(logp.reshape(-1), k)
    return scores, flat // logits.shape[-1], flat % logits.shape[-1]


def fork_first_tokens(request: Request, logits_row: jax.Array, parent_token: int) -> list[int]:
    """First tokens of samples 1 .. n - 1 of an `n > 1` request, from the logits of sample 0's first token
    (greedy: all take sample 0's token)."""
    sp = request.sampling
    n = sp.n - 1
    if sp.temperature <= 0:
        return [parent_token] * n
    seeds = jnp.asarray([mix_seed(request.seed, i) for i in range(1, sp.n)], jnp.uint32)
    toks = _sample_many(
        logits_row, jnp.full(n, sp.temperature, jnp.float32), jnp.full(n, sp.top_k, jnp.int32),
        jnp.full(n, sp.top_p, jnp.float32), seeds, jnp.zeros(n, jnp.int32),
    )  # fmt: skip
    return [int(t) for t in np.asarray(toks)]


def beam_candidates(request: Request, beams: list[Sequence], logits: jax.Array) -> BeamCandidates:
    """Score the continuations of `beams` (their logits rows [W, V] in order) and keep the best 2 x beam_width."""
    cum = jnp.asarray([b.cum_logprob for b in beams], jnp.float32)
    scores, parents, toks = (np.asarray(a) for a in _top_candidates(logits, cum, 2 * request.sampling.beam_width))
    return BeamCandidates(request, beams, scores.tolist(), parents.tolist(), toks.tolist())


# State changes (scheduler) --------------------------------------------------------------------------------------
def fork_samples(scheduler: Scheduler, parent: Sequence, first_tokens: list[int]) -> list[Sequence]:
    """Fork samples 1 .. n - 1 off `parent` (fully computed, its first token pending), each pending its own first
    token; they share every block of the parent."""
    req = parent.request
    children = []
    for i, token in enumerate(first_tokens, start=1):
        child = Sequence(scheduler._new_seq_id(), req, list(parent.tokens), parent.num_prompt, sample_index=i,
                         status=SeqStatus.RUNNING, num_computed=parent.num_computed, pending=token)  # fmt: skip
        scheduler.manager.fork(parent.seq_id, child.seq_id)
        req.seqs.append(child)
        children.append(child)
    return children


def beam_step(scheduler: Scheduler, cand: BeamCandidates) -> int:
    """Advance a beam request by one token: finished candidates are ranked, the best beam_width live ones become
    the new beams (forked off their parents), the old beams are freed; at max_tokens (or once beam_width beams
    finished) the request ends. Returns the tokens generated."""
    req, beams, m = cand.request, cand.beams, scheduler.manager
    sp = req.sampling
    w = sp.beam_width
    new_len = len(beams[0].tokens) - beams[0].num_prompt + 1
    chosen = []
    for score, p, t in zip(cand.scores, cand.parents, cand.tokens):
        if not sp.ignore_eos and t in sp.stop_token_ids:
            out = beams[p].tokens[beams[p].num_prompt :] + [t]
            req.finished_beams.append((score / new_len**sp.length_penalty, out, "stop"))
            continue
        chosen.append((score, p, t))
        if len(chosen) == w:
            break
    if new_len >= sp.max_tokens or len(req.finished_beams) >= w:
        for score, p, t in chosen:
            out = beams[p].tokens[beams[p].num_prompt :] + [t]
            req.finished_beams.append((score / new_len**sp.length_penalty, out, "length"))
        for b in beams:
            scheduler.release_seq(b)
        return len(chosen)
    new = []
    for score, p, t in chosen:
        parent = beams[p]
        child = Sequence(scheduler._new_seq_id(), req, list(parent.tokens), parent.num_prompt,
                         status=SeqStatus.RUNNING, num_computed=parent.num_computed, pending=t, cum_logprob=score)  # fmt: skip
        m.fork(parent.seq_id, child.seq_id)
        new.append(child)
    for b in beams:
        m.free(b.seq_id)
        b.status = SeqStatus.FINISHED
    req.seqs = [s for s in req.seqs if s not in beams] + new
    return len(chosen)
