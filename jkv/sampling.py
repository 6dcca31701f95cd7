"""Sampling parameters (validated on the host) and the batched on-device sampler.

Every request draws its random numbers from its own key, `fold_in(PRNGKey(seed), token_index)`, so the tokens a
request samples do not depend on which other requests share its batch, nor on preemption and recompute.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from planner.memory import SAMPLER_ROWS  # rows sampled at a time: the sort's workspace stays ~SAMPLER_ROWS x V


MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (OpenAI's limit); the device computes these
SEED_LIMIT = 2**32  # seeds are folded into uint32 sampler keys: seeds s and s + 2**32 would draw the same tokens


def _as_int(name: str, value: Any) -> int:
    """value (a Python or numpy integer, not a bool) as a Python int; TypeError otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise TypeError(f"{name}={value!r} is a {type(value).__name__}: pass an integer.")


def _as_float(name: str, value: Any, what: str) -> float:
    """value (a finite Python or numpy int/float, not a bool) as a Python float; `what` says the allowed range."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}: pass {what}.")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not finite: pass {what}.")
    return float(value)


def _as_stop_strings(value: Any) -> tuple[str, ...]:
    """One stop string or any iterable of them as a tuple of non-empty strings."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable) or isinstance(value, (bytes, bytearray)):
        raise TypeError(f"stop={value!r} is a {type(value).__name__}: pass a string or a list of strings.")
    out = tuple(value)
    for s in out:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop holds {s!r}: stop strings are non-empty strings.")
    return out


def _as_logprobs(name: str, value: Any) -> int | None:
    if value is None:
        return None
    k = _as_int(name, value)
    if not 0 <= k <= MAX_LOGPROBS:
        raise ValueError(f"{name}={k} must be between 0 and {MAX_LOGPROBS} (alternatives per token), or None.")
    return k


def _as_stop_ids(value: Any) -> tuple[int, ...]:
    """One token id or any iterable of them as a tuple of non-negative Python ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        value = (value,)
    elif isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
        raise TypeError(f"stop_token_ids={value!r} is a {type(value).__name__}: pass a token id or a list of them.")
    try:
        ids = tuple(value)
    except TypeError:  # e.g. a 0-d numpy array: Iterable by type, not iterable
        raise TypeError(f"stop_token_ids={value!r} is not iterable: pass a token id or a list of them.") from None
    for t in ids:
        if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_)):
            raise TypeError(f"stop_token_ids holds {t!r} ({type(t).__name__}): pass integer token ids.")
        if t < 0:
            raise ValueError(f"stop_token_ids holds {t}: token ids are >= 0.")
    return tuple(int(t) for t in ids)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each request's next tokens.

    max_tokens: tokens to generate. temperature 0 is greedy. top_k 0 and top_p 1 turn those filters off.
    seed: per-request seed in [0, 2**32) (None: derived from the request id). stop_token_ids: one id or an
    iterable of ids; generation ends after one of them (it is included in the output). n: independent samples
    sharing the prompt's KV blocks. beam_width > 1: beam search (deterministic; temperature, top_k, top_p are
    ignored); length_penalty: a finished beam scores log-prob / length**length_penalty.
    ignore_eos: keep going past stop tokens (benchmarks). stop: strings that end generation when they appear in
    the detokenized text; the text is cut before the first one (its tokens are kept up to the one completing it).
    logprobs: per generated token, its log-probability under the model's distribution (raw logits, before
    temperature and filters) and the top `logprobs` alternatives (0..20; None: none). prompt_logprobs: the same
    for every prompt token after the first (the request then takes no prefix-cache hits).

    Numpy integer and float scalars are accepted where Python ints and floats are, and stored as Python ints and
    floats (stop_token_ids as a tuple of ints). A value of the wrong type raises TypeError (bools are not
    integers here); a value out of range raises ValueError. The vocabulary is the engine's: it calls
    `check_vocab` when a request is added.
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
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("max_tokens", "n", "beam_width"):
            store(name, _as_int(name, getattr(self, name)))
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        store("top_k", _as_int("top_k", self.top_k))
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be an integer >= 0 (0 turns it off).")
        store("temperature", _as_float("temperature", self.temperature, "a finite number >= 0 (0 means greedy)"))
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 means greedy).")
        store("top_p", _as_float("top_p", self.top_p, "a number in (0, 1] (1 turns it off)"))
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 turns it off).")
        store("length_penalty", _as_float("length_penalty", self.length_penalty, "a finite number (1 is neutral)"))
        if self.beam_width > 1 and self.n > self.beam_width:
            raise ValueError(f"n={self.n} must not exceed beam_width={self.beam_width} in beam search.")
        if self.seed is not None:
            store("seed", _as_int("seed", self.seed))
            if not 0 <= self.seed < SEED_LIMIT:
                raise ValueError(f"seed={self.seed} must be in [0, 2**32) (or None to derive it from the request id).")
        store("stop_token_ids", _as_stop_ids(self.stop_token_ids))
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            kind = type(self.ignore_eos).__name__
            raise TypeError(f"ignore_eos={self.ignore_eos!r} is a {kind}: pass True or False.")
        store("ignore_eos", bool(self.ignore_eos))
        store("stop", _as_stop_strings(self.stop))
        store("logprobs", _as_logprobs("logprobs", self.logprobs))
        store("prompt_logprobs", _as_logprobs("prompt_logprobs", self.prompt_logprobs))
        if self.beam_width > 1 and (self.stop or self.logprobs is not None):
            raise ValueError("beam search takes no stop strings or logprobs: drop them, or sample with n instead.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.beam_width > 1

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a stop token id is outside [0, vocab_size) (the engine calls this at add_request)."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(
                    f"stop_token_ids holds {t}, outside the vocabulary [0, {vocab_size}): pass ids below {vocab_size}."
                )



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


@jax.jit
def token_logprobs(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities under the model's distribution (raw logits [..., V], no temperature or filters):
    each token's [...] and the MAX_LOGPROBS most likely ones, values [..., K] and ids [..., K], best first.
    A token < 0 (nothing to score) gets a meaningless value."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, jnp.maximum(tokens, 0)[..., None], axis=-1)[..., 0]
    top, ids = jax.lax.top_k(logp, MAX_LOGPROBS)
    return chosen, top, ids
