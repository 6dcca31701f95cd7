"""The Llama-family decoder (llama, mistral, qwen2, qwen3): a pure `forward` over a parameter tree, with rotary
positions computed exactly as transformers computes them.

Architecture (transformers' `LlamaForCausalLM` and its relatives): token embedding, pre-RMSNorm blocks
(`x + attn(input_layernorm(x))`, `x + mlp(post_attention_layernorm(x))`), grouped-query attention with rotary
positions, a SwiGLU MLP (`down(silu(gate(x)) * up(x))`), a final RMSNorm and an untied or tied lm-head. The
family members differ only in flags `kvspec.ModelConfig` already carries:
- mistral: a sliding window on every layer (query i sees keys j with i - W < j <= i), served by the engine's
  window path;
- qwen2: biases on q/k/v (not on o_proj);
- qwen3: a per-head RMSNorm on queries and keys (`q_norm` / `k_norm`) before the rotation, and an explicit
  head_dim;
- llama: optional `attention_bias` (q/k/v/o) and `mlp_bias`.

Numerics follow transformers: RMSNorm normalises in float32 and multiplies its weight in the input dtype; the
rotary tables are float32 whatever the weights (transformers computes them under autocast-off float32); attention
scores, softmax and logits are float32; float32 matmuls run at HIGHEST precision (`jkv.model.matmul_precision`).

Parameters keep transformers' names and torch's layout, so loading a checkpoint is a rename, never a transpose:
`embed_tokens/weight` [V, E], `layers_{i}/self_attn/{q,k,v,o}_proj/weight` [out, in] (+ `bias`),
`layers_{i}/self_attn/{q,k}_norm/weight` [D], `layers_{i}/mlp/{gate,up,down}_proj/weight`,
`layers_{i}/{input,post_attention}_layernorm/weight`, `norm/weight`, `lm_head/weight` [V, E] (untied only).

The attention seam is `jkv.model`'s `AttentionFn`: q, k arrive rotated; an `attend` with `takes_qkv` receives
[q | k | v] stacked on the head axis.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvspec.config import ConfigError, ModelConfig

Params = dict[str, Any]
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


# Rotary positions ---------------------------------------------------------------------------------------------
def rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """config.json's rope_scaling / rope_parameters as a dict with `rope_type` and `rope_theta` filled in."""
    raw = dict(config.rope_scaling)
    kind = raw.get("rope_type", raw.get("type", "default"))
    theta = config.rope_theta if config.rope_theta is not None else raw.get("rope_theta", 10000.0)
    return {**raw, "rope_type": kind, "rope_theta": float(theta)}


def check_rope(config: ModelConfig, where: str) -> None:
    """Raise ConfigError for a rotary setting jkv does not reproduce exactly."""
    rope = rope_parameters(config)
    kind = rope["rope_type"]
    if kind == "dynamic":
        raise ConfigError(
            f"{where}: rope_type 'dynamic' rescales the rotation by the length of each forward call, which a "
            "paged cache with chunked prefill cannot reproduce; use 'yarn' or 'linear' scaling instead."
        )
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope_type {kind!r} is not supported: use one of {', '.join(ROPE_TYPES)}.")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported by jkv's Llama family.")
    if kind != "default" and "factor" not in rope:
        raise ConfigError(f"{where}: rope_type {kind!r} needs a 'factor' in rope_scaling.")
    if config.head_dim % 2:
        raise ConfigError(f"{where}: head_dim={config.head_dim} must be even for rotary positions.")


@functools.lru_cache(maxsize=64)
def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [D/2], attention_scaling): transformers' `ROPE_INIT_FUNCTIONS` for this config.

    Computed in float32 as transformers computes them, so the tables match its bit for bit where it matters.
    """
    rope = rope_parameters(config)
    kind, base, dim = rope["rope_type"], rope["rope_theta"], config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = np.float32(base) ** exponents  # [D/2]
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    scaling = 1.0
    if kind == "linear":
        inv_freq = (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        inv_freq, scaling = _yarn(rope, dim, base, config.n_positions, pos_freqs)
    return inv_freq, float(scaling)


def _yarn(rope: dict, dim: int, base: float, max_positions: int, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    """YaRN (transformers' `_compute_yarn_parameters`): interpolate the low frequencies, keep the high ones."""
    factor = float(rope["factor"])
    original = rope.get("original_max_position_embeddings") or max_positions

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
    inv_inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)
    return inv_freq, float(attention)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) float32 [B, T, D] for integer positions [B, T], the halves repeated (transformers' layout)."""
    inv_freq, scaling = rope_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, D]
    return jnp.cos(angles) * jnp.float32(scaling), jnp.sin(angles) * jnp.float32(scaling)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D] rotated by cos/sin [B, T, D]: x * cos + rotate_half(x) * sin, computed in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


# Layers -------------------------------------------------------------------------------------------------------
def rms_norm(p: Params, x: jax.Array, epsilon: float) -> jax.Array:
    """transformers' RMSNorm: normalise in float32, cast back, then multiply the weight in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + jnp.float32(epsilon))
    return (p["weight"].astype(x.dtype) * y.astype(x.dtype)).astype(x.dtype)


def linear(p: Params, x: jax.Array) -> jax.Array:
    """x @ weight.T (+ bias): torch's nn.Linear over a [out, in] weight, with no transpose in memory."""
    from jkv.model import matmul_precision

    w = p["weight"]
    y = jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())),
                            precision=matmul_precision(w.dtype))  # fmt: skip
    return y + p["bias"].astype(w.dtype) if "bias" in p else y


def attention(p: Params, config: ModelConfig, layer_index: int, x: jax.Array, cos: jax.Array, sin: jax.Array,
              cache: Any, attend, tp: int = 1) -> tuple[jax.Array, Any]:  # fmt: skip
    b, t, _ = x.shape
    h, hkv, d = config.n_head, config.kv_heads, config.head_dim
    q = linear(p["q_proj"], x).reshape(b, t, h, d)  # [B, T, H, D]
    k = linear(p["k_proj"], x).reshape(b, t, hkv, d)  # [B, T, Hkv, D]
    v = linear(p["v_proj"], x).reshape(b, t, hkv, d)  # [B, T, Hkv, D]
    if config.qk_norm:
        q = rms_norm(p["q_norm"], q, config.layer_norm_epsilon)
        k = rms_norm(p["k_norm"], k, config.layer_norm_epsilon)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if getattr(attend, "takes_qkv", False):
        # grouped by tensor-parallel shard (jkv.sharding): [q_s | k_s | v_s] for s = 0 .. tp - 1
        per_shard = [a.reshape(b, t, tp, a.shape[2] // tp, d) for a in (q, k, v)]  # [B, T, N, heads / N, D]
        qkv = jnp.concatenate(per_shard, axis=3).reshape(b, t, h + 2 * hkv, d)
        out, cache = attend(layer_index, qkv, None, None, cache)
    else:
        out, cache = attend(layer_index, q, k, v, cache)
    return linear(p["o_proj"], out.reshape(b, t, h * d)), cache  # [B, T, E]


def mlp(p: Params, x: jax.Array) -> jax.Array:
    gate = linear(p["gate_proj"], x)
    act = jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype)
    return linear(p["down_proj"], act * linear(p["up_proj"], x))  # [B, T, E]


def decoder_layer(p: Params, config: ModelConfig, layer_index: int, x: jax.Array, cos: jax.Array, sin: jax.Array,
                  cache: Any, attend, tp: int = 1) -> tuple[jax.Array, Any]:  # fmt: skip
    eps = config.layer_norm_epsilon
    a, cache = attention(p["self_attn"], config, layer_index, rms_norm(p["input_layernorm"], x, eps), cos, sin,
                         cache, attend, tp)  # fmt: skip
    x = x + a
    return x + mlp(p["mlp"], rms_norm(p["post_attention_layernorm"], x, eps)), cache


def forward(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array, cache: Any, attend, *,
            logits_index: jax.Array | None = None, mesh=None) -> tuple[jax.Array, Any]:  # fmt: skip
    """One decoder pass over new tokens, with `jkv.model.forward`'s contract (positions drive the rotation)."""
    from jkv.model import matmul_precision, vocab_logits

    embed = params["embed_tokens"]["weight"]  # [V, E]
    x = jnp.take(embed, tokens, axis=0)  # [B, T, E]
    cos, sin = rope_tables(config, positions)
    tp = 1 if mesh is None else mesh.size
    for i in range(config.n_layer):
        x, cache = decoder_layer(params[f"layers_{i}"], config, i, x, cos, sin, cache, attend, tp)
    x = rms_norm(params["norm"], x, config.layer_norm_epsilon)
    if logits_index is not None:
        x = x[jnp.arange(x.shape[0]), logits_index]  # [B, E]
    table = embed if config.tie_word_embeddings else params["lm_head"]["weight"]  # [V, E]
    logits = jnp.einsum("...e,ve->...v", x.astype(table.dtype), table, precision=matmul_precision(table.dtype),
                        preferred_element_type=jnp.float32)  # fmt: skip
    return vocab_logits(logits, config, mesh), cache  # [B, (T,) V]


# Parameter names and random weights ---------------------------------------------------------------------------
def param_path(name: str) -> tuple[str, ...]:
    """A transformers tensor name as this module's tree path: model.layers.3.mlp.up_proj.weight ->
    ('layers_3', 'mlp', 'up_proj', 'weight')."""
    parts = name.removeprefix("model.").split(".")
    if parts[0] == "layers":
        parts = [f"layers_{parts[1]}", *parts[2:]]
    return tuple(parts)


def random_init(name: str, config: ModelConfig) -> tuple[str, float]:
    """How a preset's random weights are drawn: ('ones' | 'zeros' | 'normal', std), transformers' init
    (N(0, initializer_range=0.02) for matrices, norms 1, biases 0)."""
    if name.endswith("norm.weight"):
        return "ones", 0.0
    if name.endswith(".bias"):
        return "zeros", 0.0
    return "normal", 0.02


def check_config(config: ModelConfig, where: str) -> None:
    """Raise ConfigError for a Llama-family config jkv's model does not reproduce."""
    if config.model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type={config.model_type!r} is planned by `jkv plan` but not served yet: jkv's engine "
            f"runs gpt2 and {', '.join(MODEL_TYPES)}."
        )
    if config.hybrid_attention:
        raise ConfigError(
            f"{where}: this config mixes sliding-window and full-attention layers, which jkv's engine does not "
            "serve yet: set use_sliding_window=false, or use a model whose layers all attend alike."
        )
    if config.moe is not None or config.mla is not None or config.vision is not None:
        raise ConfigError(f"{where}: mixture-of-experts, MLA and vision towers are planned but not served yet.")
    check_rope(config, where)
