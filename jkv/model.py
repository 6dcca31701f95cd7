"""The model seam: `forward` for every family (GPT-2 here, the Llama family in `jkv.llama`), the attention
contract, and the GPT-2 decoder as pure functions over a Flax-layout parameter tree.

Architecture (as Hugging Face's `GPT2LMHeadModel`): learned token and position embeddings, pre-LayerNorm blocks
(`x + attn(ln_1(x))`, `x + mlp(ln_2(x))`), GELU with the tanh approximation ("gelu_new"), a final `ln_f`, and
logits from the tied token embedding. Weights and compute use the dtype of the parameters (float32, bfloat16 or
float16); LayerNorm, softmax and the logits are computed in float32, and float32 matmuls run at HIGHEST precision.

Why plain functions rather than Linen or NNX modules: everything above this module wants `forward(params, ...)`
to be a pure function of a plain nested-dict parameter pytree -- the weight loader fills it by a tree map, orbax
saves it as is, and the paged engine jits and donates around it. The tree keeps Flax's layout, so checkpoints
written by the earlier Linen model load unchanged; without `Module.apply` a trace skips Linen's per-parameter
checks.

Parameter names are Hugging Face's (`wte`, `wpe`, `h_{i}/ln_1`, `h_{i}/attn/c_attn`, `h_{i}/attn/c_proj`,
`h_{i}/ln_2`, `h_{i}/mlp/c_fc`, `h_{i}/mlp/c_proj`, `ln_f`) with Flax leaf names (`embedding`, `kernel`, `bias`,
`scale`), so loading a checkpoint is a rename, never a reshuffle.

The attention contract (`AttentionFn`) is the seam the paged engine and the Pallas kernels plug into:

    out, cache = attend(layer_index, q, k, v, cache)

    layer_index  Python int, 0 .. n_layer - 1
    q            [B, T, H, D]     the new tokens' queries (not yet scaled)
    k, v         [B, T, Hkv, D]   the new tokens' keys and values, Hkv = config.kv_heads
    cache        any pytree, threaded through all layers in order and returned by `forward`
    out          [B, T, H, D]     softmax(q k^T / sqrt(D)) v over whatever keys the cache says each query sees

`attend_no_cache` below is the full-recompute implementation (causal over the T tokens given, cache=None);
`jkv.reference.dense_attend` is the contiguous-KV-cache one.

An `attend` with the attribute `takes_qkv = True` is called instead as `attend(layer_index, qkv, None, None,
cache)` with the projection's whole output viewed as qkv [B, T, H + 2 * Hkv, D] (query heads, then key heads,
then value heads): a kernel that reads q, k and v out of it saves the copies a split makes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kvspec.config import ModelConfig

Params = dict[str, Any]
AttentionFn = Callable[[int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def matmul_precision(dtype: Any) -> jax.lax.Precision | None:
    """HIGHEST for float32 operands, else the default.

    NOTE: on NVIDIA GPUs JAX's default precision runs float32 matmuls through TF32/bf16 passes: measured on an
    H100, gpt2-size logits then differ from Hugging Face's float64 by 0.43 (of 72) instead of 3e-4. float32 is
    the parity/oracle dtype, so it gets true float32 matmuls; bfloat16/float16 are unaffected.
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# Masked scores get the most negative float32 rather than -inf: exp() of it underflows to exactly 0, and a row
# can never turn into NaN (every query always sees at least its own key).
_MASKED = float(jnp.finfo(jnp.float32).min)


# Attention math ---------------------------------------------------------------------------------------------
def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v with a boolean mask; scores and softmax in float32.

    q [B, T, H, D]; k, v [B, S, Hkv, D]; mask [B, T, S] (True = query t may see key s). Returns [B, T, H, D]
    in q's dtype. Grouped-query / multi-query attention (Hkv < H): query head h reads KV head h // (H // Hkv),
    the same as repeating each KV head H // Hkv times, done here by grouping the query heads instead of
    materialising the repeated keys.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    assert h % hkv == 0, (h, hkv)
    dot = functools.partial(
        jnp.einsum, precision=matmul_precision(q.dtype), preferred_element_type=jnp.float32
    )
    qg = q.reshape(b, t, hkv, h // hkv, d)  # [B, T, Hkv, G, D]
    scores = dot("btkgd,bskd->bkgts", qg, k)  # [B, Hkv, G, T, S]
    scores = scores / jnp.float32(math.sqrt(d))
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = dot("bkgts,bskd->btkgd", probs, v)  # [B, T, Hkv, G, D]
    return out.reshape(b, t, h, d).astype(q.dtype)  # [B, T, H, D]


def attend_no_cache(
    layer_index: int, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any
) -> tuple[jax.Array, Any]:
    """Full recompute: causal attention over the T tokens of this call; no cache (returned unchanged).

    Right-padded rows are fine: a real token never sees the padding after it.
    """
    return causal_attend(None)(layer_index, q, k, v, cache)


@functools.cache
def causal_attend(window: int | None) -> AttentionFn:
    """`attend_no_cache` limited to a sliding window: query i sees keys j with i - window < j <= i (the same
    function object per window, so it can be a static jit argument)."""

    def attend(layer_index: int, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        del layer_index
        t = q.shape[1]
        i, j = np.arange(t)[:, None], np.arange(t)[None, :]
        mask = (j <= i) if window is None else (j <= i) & (j > i - window)  # [T, T]
        return masked_attention(q, k, v, jnp.broadcast_to(jnp.asarray(mask), (q.shape[0], t, t))), cache

    return attend


# The decoder as functions of the parameter pytree ------------------------------------------------------------
# Plain functions, not Linen modules: tracing a step then costs only the computation (Linen's `apply` checked
# every parameter's shape against its initializer on each trace, a sixth of a restart's tracing). Numerics are
# those of Flax's `Dense` / `Embed` the checkpoints were written for: inputs cast to the weights' dtype, one
# `dot_general` at `matmul_precision`, the bias added in that dtype.
def layer_norm(p: Params, x: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm computed in float32 whatever the weight dtype (as GPT-2's reference does); returns x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)  # two-pass variance, as torch
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def dense(p: Params, x: jax.Array) -> jax.Array:
    """x @ kernel + bias. HF GPT-2's Conv1D stores its weight [in, out], a Flax kernel's layout: no transpose."""
    kernel = p["kernel"]
    y = jax.lax.dot_general(x.astype(kernel.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            precision=matmul_precision(kernel.dtype))  # fmt: skip
    return y + p["bias"].astype(kernel.dtype)


def attention(p: Params, config: ModelConfig, layer_index: int, x: jax.Array, cache: Any,
              attend: AttentionFn, tp: int = 1) -> tuple[jax.Array, Any]:  # fmt: skip
    b, t, e = x.shape
    h, hkv, d = config.n_head, config.kv_heads, config.head_dim
    qkv = dense(p["c_attn"], x)  # [B, T, H * D + 2 * Hkv * D], per shard [q_s | k_s | v_s] (jkv.sharding)
    if getattr(attend, "takes_qkv", False):
        out, cache = attend(layer_index, qkv.reshape(b, t, h + 2 * hkv, d), None, None, cache)
    else:
        per_shard = qkv.reshape(b, t, tp, (h + 2 * hkv) // tp, d)  # [B, T, N, H/N + 2 Hkv/N, D]
        q, k, v = jnp.split(per_shard, [h // tp, (h + hkv) // tp], axis=3)
        q = q.reshape(b, t, h, d)  # [B, T, H, D]
        k = k.reshape(b, t, hkv, d)  # [B, T, Hkv, D]
        v = v.reshape(b, t, hkv, d)  # [B, T, Hkv, D]
        out, cache = attend(layer_index, q, k, v, cache)
    return dense(p["c_proj"], out.reshape(b, t, h * d)), cache  # [B, T, E]


def mlp(p: Params, x: jax.Array) -> jax.Array:
    y = dense(p["c_fc"], x)  # [B, T, F]
    y = jax.nn.gelu(y.astype(jnp.float32), approximate=True).astype(y.dtype)  # GPT-2's "gelu_new" (tanh)
    return dense(p["c_proj"], y)  # [B, T, E]


def block(p: Params, config: ModelConfig, layer_index: int, x: jax.Array, cache: Any,
          attend: AttentionFn, tp: int = 1) -> tuple[jax.Array, Any]:  # fmt: skip
    eps = config.layer_norm_epsilon
    a, cache = attention(p["attn"], config, layer_index, layer_norm(p["ln_1"], x, eps), cache, attend, tp)
    x = x + a
    return x + mlp(p["mlp"], layer_norm(p["ln_2"], x, eps)), cache


def forward(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Any,
    attend: AttentionFn,
    *,
    logits_index: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Any]:
    """One decoder pass of the family `config.model_type` names: GPT-2 below, the Llama family in `jkv.llama`.

    Pure, so `jax.jit(forward, static_argnums=(1, 5))` works; every family keeps the contract of `gpt2_forward`.
    mesh: the one-axis tensor-parallel mesh the parameters are laid out and sharded for (jkv.sharding); None: one
    device. Over N devices GPT-2's fused QKV output and a `takes_qkv` attend's input are grouped by shard
    ([q | k | v] of shard 0, then of shard 1, ...), and the lm-head's logits are computed split by vocabulary.
    """
    if config.model_type == "gpt2":
        return gpt2_forward(params, config, tokens, positions, cache, attend, logits_index=logits_index, mesh=mesh)
    from jkv import llama

    return llama.forward(params, config, tokens, positions, cache, attend, logits_index=logits_index, mesh=mesh)


def gpt2_forward(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Any,
    attend: AttentionFn,
    *,
    logits_index: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Any]:
    """One decoder pass over new tokens; pure, so `jax.jit(forward, static_argnums=(1, 5))` works.

    tokens, positions [B, T] int32 (positions index the learned position table; for a cache they are the
    tokens' places in their sequences). `cache` and `attend` follow the contract in the module docstring.
    logits_index [B] int32 picks one of the T positions per row: logits are then [B, V], else [B, T, V];
    always float32. Returns (logits, the cache as `attend` left it after the last layer).
    The compute dtype is the parameters' dtype.
    """
    wte = params["wte"]["embedding"]
    x = jnp.take(wte, tokens, axis=0) + jnp.take(params["wpe"]["embedding"], positions, axis=0)  # [B, T, E]
    tp = 1 if mesh is None else mesh.size
    for i in range(config.n_layer):
        x, cache = block(params[f"h_{i}"], config, i, x, cache, attend, tp)
    x = layer_norm(params["ln_f"], x, config.layer_norm_epsilon)  # [B, T, E]
    if logits_index is not None:
        x = x[jnp.arange(x.shape[0]), logits_index]  # [B, E]
    table = wte if config.tie_word_embeddings else params["lm_head"]  # [V, E]
    logits = jnp.einsum("...e,ve->...v", x, table, precision=matmul_precision(table.dtype),
                        preferred_element_type=jnp.float32)  # fmt: skip
    return vocab_logits(logits, config, mesh), cache  # [B, (T,) V]


def vocab_logits(logits: jax.Array, config: ModelConfig, mesh: Mesh | None) -> jax.Array:
    """The lm-head's output as the vocabulary's float32 logits. Over a mesh the logits stay split by vocabulary,
    as the head's rows are (else XLA may gather the whole head onto every device instead of the logits); the
    padding rows of a vocab-parallel head are dropped."""
    if mesh is not None and mesh.size > 1:
        spec = PartitionSpec(*(None,) * (logits.ndim - 1), mesh.axis_names[0])
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, spec))
    if logits.shape[-1] > config.vocab_size:
        logits = logits[..., : config.vocab_size]
    return logits.astype(jnp.float32)


_forward_jit = jax.jit(forward, static_argnums=(1, 5))


class Model:
    """A loaded model: `.config` (kvspec.ModelConfig), `.params` (pytree), `.dtype`, `.source`, `.eos_token_ids`.

    Made by `jkv.load_model`; `source` is the preset name or checkpoint directory it came from (the tokenizer
    getter takes the same string); `eos_token_ids` are generation_config.json's end-of-sequence ids (empty when
    the checkpoint names none), which `jkv.generate` and the server stop on unless told to ignore them.
    """

    def __init__(self, config: ModelConfig, params: Params, dtype: Any, source: str = "",
                 eos_token_ids: tuple[int, ...] = ()) -> None:  # fmt: skip
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.source = source
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)

    def __repr__(self) -> str:
        return f"Model({self.config.name!r}, dtype={self.dtype.name}, source={self.source!r})"

    def check_tokens(self, token_ids: Any, what: str = "token_ids") -> np.ndarray:
        """token_ids as a 1-D int32 numpy array after checking length and range (raises ValueError)."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"{what} must be a non-empty 1-D sequence of integer token ids, got shape {ids.shape}."
            )
        if ids.shape[0] > self.config.n_positions:
            raise ValueError(
                f"{what} has {ids.shape[0]} tokens but {self.config.name} covers {self.config.n_positions} "
                "positions: shorten the input."
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"{what} holds id {lo if lo < 0 else hi}, outside [0, {self.config.vocab_size})."
            )
        return ids.astype(np.int32)

    def logits(self, token_ids: Any) -> np.ndarray:
        """Full forward over one sequence, no cache: a float32 numpy array [T, vocab]."""
        ids = self.check_tokens(token_ids)
        t = ids.shape[0]
        logits, _ = _forward_jit(self.params, self.config, ids[None], np.arange(t, dtype=np.int32)[None], None,
                                 causal_attend(self.config.sliding_window))  # fmt: skip
        return np.asarray(logits[0], dtype=np.float32)
