"""Dense reference generation: a contiguous KV cache, `dense_attend`, and `reference_generate`.

This is the oracle the paged engine is held to, so it is written for clarity, not speed.

The dense cache pytree (`DenseCache`):

    k, v     tuple of n_layer arrays, each [B, S_max, Hkv, D] in the model's dtype; row b's token at position p
             lives at index p (contiguous, one slot per position, S_max reserved per row up front)
    lengths  [B] int32: how many tokens of row b the cache holds; the next tokens are written from index
             lengths[b] on, and query t of a call sees keys 0 .. lengths[b] + t

`dense_attend` writes the call's T new keys/values at lengths[b] .. lengths[b] + T - 1 and attends causally, but
does NOT advance `lengths`: every layer of one forward must see the same value, and only the caller knows how
many of the T tokens were real (a right-padded prefill writes padding that later tokens overwrite). After each
forward the caller sets `lengths` itself (`cache._replace(lengths=...)`). `positions` passed to `forward` must be
`lengths[:, None] + arange(T)` for the real tokens.

Sampling (shared with anything compared against this): greedy is `argmax` (lowest id on ties); with
temperature > 0, request i's token at step s (s = 0 for the first generated token) is
`jax.random.categorical(fold_in(fold_in(key(seed), i), s), logits / temperature)` on float32 logits.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jkv.model import Model, causal_attend, forward, masked_attention
from jkv.prompts import as_prompt_list, as_token_ids
from kvspec.config import ModelConfig


class DenseCache(NamedTuple):
    k: tuple[jax.Array, ...]  # n_layer x [B, S_max, Hkv, D]
    v: tuple[jax.Array, ...]  # n_layer x [B, S_max, Hkv, D]
    lengths: jax.Array  # [B] int32


def init_dense_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any) -> DenseCache:
    """An empty cache of `max_len` slots per row (lengths all 0)."""
    shape = (batch, max_len, config.kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
    return DenseCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
                      lengths=jnp.zeros((batch,), jnp.int32))  # fmt: skip


def _write_rows(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    # buf [B, S, Hkv, D], new [B, T, Hkv, D], starts [B]: buf[b, starts[b] : starts[b] + T] = new[b].
    # NOTE: dynamic_update_slice clamps a start that would run past S; callers must size S_max for every token.
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (s, 0, 0)))(
        buf, new.astype(buf.dtype), starts
    )


def dense_attend(
    layer_index: int, q: jax.Array, k: jax.Array, v: jax.Array, cache: DenseCache
) -> tuple[jax.Array, DenseCache]:
    """The `AttentionFn` over a `DenseCache`: write this call's K/V, attend causally over the row's prefix."""
    return _dense_attend(layer_index, q, k, v, cache, None)


@functools.cache
def windowed_dense_attend(window: int | None):
    """`dense_attend` over the last `window` positions (query i sees keys i - window < j <= i); one function
    object per window, so it can be a static jit argument."""
    if window is None:
        return dense_attend
    return functools.partial(_dense_attend, window=window)


def _dense_attend(layer_index: int, q: jax.Array, k: jax.Array, v: jax.Array, cache: DenseCache,
                  window: int | None) -> tuple[jax.Array, DenseCache]:  # fmt: skip
    k_all = _write_rows(cache.k[layer_index], k, cache.lengths)  # [B, S, Hkv, D]
    v_all = _write_rows(cache.v[layer_index], v, cache.lengths)  # [B, S, Hkv, D]
    t, s = q.shape[1], k_all.shape[1]
    q_pos = cache.lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    key_pos = jnp.arange(s)[None, None, :]
    mask = key_pos <= q_pos[:, :, None]  # [B, T, S]
    if window is not None:
        mask &= key_pos > q_pos[:, :, None] - window
    out = masked_attention(q, k_all, v_all, mask)  # [B, T, H, D]
    i = layer_index
    cache = cache._replace(
        k=(*cache.k[:i], k_all, *cache.k[i + 1 :]), v=(*cache.v[:i], v_all, *cache.v[i + 1 :])
    )
    return out, cache


def _forward_with_cache(params, config, tokens, positions, cache, logits_index):
    attend = windowed_dense_attend(config.sliding_window)
    return forward(params, config, tokens, positions, cache, attend, logits_index=logits_index)


def _forward_no_cache(params, config, tokens, positions, logits_index):
    attend = causal_attend(config.sliding_window)
    return forward(params, config, tokens, positions, None, attend, logits_index=logits_index)[0]


_step_cached = jax.jit(_forward_with_cache, static_argnums=(1,))
_step_full = jax.jit(_forward_no_cache, static_argnums=(1,))


@jax.jit
def _sample(
    logits: jax.Array, temperature: jax.Array, key: jax.Array, rows: jax.Array, step: jax.Array
) -> jax.Array:
    # logits [B, V] float32 -> tokens [B] int32; see the module docstring for the key schedule.
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows)
    sampled = jax.vmap(jax.random.categorical)(keys, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def reference_generate(
    model: Model,
    prompt_ids: list[list[int]],
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    *,
    use_cache: bool = True,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """Generate `max_tokens` tokens for each prompt (generated tokens only), batched over ragged prompts.

    `prompt_ids` are read as `jkv.generate` reads prompts (`jkv.prompts.as_prompt_list`: a flat list of ids is
    one prompt, a 2-D int array one prompt per row), then each by `as_token_ids`: TypeError for a string or
    float/bool ids, ValueError for an empty prompt or an id outside the vocabulary.

    temperature 0 is greedy. use_cache=True prefills a `DenseCache` and decodes one token per step;
    use_cache=False recomputes the full sequence every step (the check on the cache). With `eos_token_id`, a
    row stops after emitting it (the eos token is included in its output).
    """
    config = model.config
    if max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens} must be >= 0.")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy).")
    vocab = config.vocab_size
    prompts = [as_token_ids(p, vocab, what=f"prompt {i}") for i, p in enumerate(as_prompt_list(prompt_ids))]
    if not prompts:
        return []
    lens = np.array([len(p) for p in prompts], np.int32)
    b, t_max = len(prompts), int(lens.max())
    s_max = t_max + max_tokens
    if s_max > config.n_positions:
        raise ValueError(
            f"the longest prompt ({t_max} tokens) plus max_tokens={max_tokens} exceeds the model's "
            f"{config.n_positions} positions: shorten the prompt or lower max_tokens."
        )
    out: list[list[int]] = [[] for _ in range(b)]
    if max_tokens == 0:
        return out
    buf = np.zeros((b, s_max), np.int32)  # prompt + generated tokens, right-padded with 0
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    key, rows, temp = jax.random.key(seed), jnp.arange(b, dtype=jnp.int32), jnp.float32(temperature)
    cur = lens.copy()  # tokens so far per row
    done = np.zeros(b, bool)

    if use_cache:
        cache = init_dense_cache(config, b, s_max, model.dtype)
        positions = np.broadcast_to(np.arange(t_max, dtype=np.int32), (b, t_max))
        logits, cache = _step_cached(model.params, config, buf[:, :t_max], positions, cache, lens - 1)
        cache = cache._replace(lengths=jnp.asarray(lens))
    for step in range(max_tokens):
        if not use_cache:
            positions = np.broadcast_to(np.arange(s_max, dtype=np.int32), (b, s_max))
            logits = _step_full(model.params, config, buf, positions, cur - 1)
        elif step > 0:
            # Feed last step's token at position cur - 1 (= cache.lengths), then count it in.
            tokens = buf[np.arange(b), cur - 1][:, None]  # [B, 1]
            logits, cache = _step_cached(
                model.params, config, tokens, (cur - 1)[:, None], cache, np.zeros(b, np.int32)
            )
            cache = cache._replace(lengths=jnp.asarray(cur))
        new = np.asarray(_sample(logits, temp, key, rows, jnp.int32(step)))
        for i in range(b):
            if not done[i]:
                out[i].append(int(new[i]))
                done[i] = eos_token_id is not None and int(new[i]) == eos_token_id
        if done.all() or step == max_tokens - 1:
            break
        buf[np.arange(b), cur] = new
        cur = cur + 1
    return out
