"""Sampling parameters (validated on the host) and the batched on-device sampler.

Every request draws its random numbers from its own key, `fold_in(PRNGKey(seed), token_index)`, so the tokens a
request samples do not depend on which other requests share its batch, nor on preemption and recompute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each request's next tokens.

    max_tokens: tokens to generate. temperature 0 is greedy. top_k 0 and top_p 1 turn those filters off.
    seed: per-request seed (None: derived from the request id). stop_token_ids: generation ends after one of
    them (it is included in the output). n: independent samples sharing the prompt's KV blocks.
    beam_width > 1: beam search (deterministic; temperature, top_k, top_p are ignored).
    ignore_eos: keep going past stop tokens (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    beam_width: int = 1
    length_penalty: float = 1.0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be a positive integer.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 means greedy).")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 turns it off).")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 turns it off).")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n={self.n!r} must be a positive integer.")
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width={self.beam_width!r} must be a positive integer.")
        if self.beam_width > 1 and self.n > self.beam_width:
            raise ValueError(f"n={self.n} must not exceed beam_width={self.beam_width} in beam search.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer or None.")
        if any(not isinstance(t, (int, np.integer)) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be non-negative token ids.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.beam_width > 1


from planner.memory import SAMPLER_ROWS  # rows sampled at a time: the sort's workspace stays ~SAMPLER_ROWS x V


def sample_tokens(
    logits: jax.Array,  # [B, V] float32
    temperature: jax.Array,  # [B] float32; 0 -> greedy
    top_k: jax.Array,  # [B] int32; 0 -> off
    top_p: jax.Array,  # [B] float32; 1 -> off
    seeds: jax.Array,  # [B] uint32
    counters: jax.Array,  # [B] int32: index of the token being sampled within its request
) -> jax.Array:
    """One token per row; greedy rows take the argmax. Traceable (call it inside the jitted step).

    NOTE: rows go through the sort in blocks of SAMPLER_ROWS, so a decode batch of thousands of sequences never
    holds several [B, V] float32 copies at once; the planner counts one block's workspace. The blocks are read out
    of `logits` in place (a loop of dynamic slices; the last block starts at B - SAMPLER_ROWS and overlaps the one
    before it, whose rows it samples again to the same tokens), so no padded [B, V] copy is made when B is not a
    multiple of SAMPLER_ROWS: that copy was 779 MiB at B = 4,033 (gpt2, H200), about 160 sequences' KV at 24 GB.
    """
    b = logits.shape[0]
    if b <= SAMPLER_ROWS:
        return _sample_rows(logits, temperature, top_k, top_p, seeds, counters)
    rows = (logits, temperature, top_k, top_p, seeds, counters)

    def block(i, out):
        start = jnp.minimum(i * SAMPLER_ROWS, b - SAMPLER_ROWS)
        args = (jax.lax.dynamic_slice_in_dim(a, start, SAMPLER_ROWS) for a in rows)
        return jax.lax.dynamic_update_slice_in_dim(out, _sample_rows(*args), start, 0)

    return jax.lax.fori_loop(0, -(-b // SAMPLER_ROWS), block, jnp.zeros(b, jnp.int32))


def _sample_rows(
    logits: jax.Array,  # [B, V] float32
    temperature: jax.Array,  # [B] float32; 0 -> greedy
    top_k: jax.Array,  # [B] int32; 0 -> off
    top_p: jax.Array,  # [B] float32; 1 -> off
    seeds: jax.Array,  # [B] uint32
    counters: jax.Array,  # [B] int32
) -> jax.Array:
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    order = jnp.argsort(-scaled, axis=-1)  # [B, V] descending
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, top_k, vocab)[:, None]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this token
    keep = (rank < k) & (cum_before < top_p[:, None])
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    choice = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
