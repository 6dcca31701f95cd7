"""Model shapes every part of jkv works from: presets and Hugging Face `config.json` files, for every family.

Pure Python: no JAX, no device. `ModelConfig` is the one description of a decoder's shape that the planner, the
model, the engine and the kernels use; derived figures (head size, KV geometry, parameter count) are properties,
never stored twice. Reading `config.json` is `kvspec.hf_config`; the parameter tensors of each family are
`kvspec.params`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parent / "presets"
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


class ConfigError(ValueError):
    """A model config, KV dtype or layout setting that jkv cannot use; the message says what to do.

    The planner raises the same class as `planner.PlanError` (an alias, not a subclass), so one `except` catches
    both.
    """


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """Mixture-of-experts MLPs: every expert's weights are resident; a token runs `experts_per_token` of them."""

    num_experts: int
    experts_per_token: int
    expert_dim: int  # one routed expert's intermediate size
    shared_expert_dim: int = 0  # the always-on shared expert(s), total intermediate size (0: none)
    shared_expert_gate: bool = False  # qwen2_moe: a [1, hidden] sigmoid gate on the shared expert
    sparse_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or the dense MLP (False)


@dataclass(frozen=True, slots=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): the cache holds one latent per token per layer."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: queries come from one q_proj

    @property
    def latent_dim(self) -> int:
        """Elements one token stores per layer: the compressed K/V latent plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """A multimodal checkpoint's SigLIP vision tower (Gemma 3): resident weights that hold no KV cache."""

    hidden: int
    intermediate: int
    layers: int
    patch_size: int
    image_size: int
    channels: int = 3
    use_head: bool = True  # the attention-pooling head (Gemma 3 configs turn it off)


def freeze(value: Any) -> Any:
    """A hashable copy of JSON data (dicts become sorted item tuples, lists tuples), for frozen configs."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a decoder-only transformer. The defaults describe GPT-2 (learned positions, pre-LayerNorm, GELU
    MLP, tied embedding); `model_type` names the family whose tensors `kvspec.params` lays out.

    `n_kv_head` below `n_head` is grouped-query (at 1 multi-query) attention. `sliding_window` limits attention to
    the last W positions: on every layer, or, when `layer_types` is given, on the `sliding_attention` layers only.
    """

    name: str
    vocab_size: int = 50257
    n_positions: int = 1024  # the longest context the model covers (learned positions, or the RoPE reach)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: same as n_head (multi-head attention)
    n_inner: int | None = None  # None: 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    model_type: str = "gpt2"
    attention_head_dim: int | None = None  # an explicit head size (config.json's head_dim); None: n_embd // n_head
    layer_types: tuple[str, ...] | None = None  # per layer full_attention / sliding_attention; None: all alike
    attention_bias: bool = False  # the family's attention biases (kvspec.params says which tensors)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (qwen3, gemma3)
    rope_theta: float | None = None
    rope_scaling: tuple = ()  # freeze()d rope_scaling / rope_parameters, as config.json gives it
    # Metadata, not shape (left out of equality): config.json's torch_dtype / dtype, and whether a preset.
    weight_dtype: str | None = field(default=None, compare=False)
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    vision: VisionConfig | None = None
    options: tuple[tuple[str, Any], ...] = ()  # other structural flags of a family (falcon's), see option()
    preset: bool = field(default=False, compare=False)  # shapes from a packaged public config: no weights

    def __post_init__(self) -> None:
        for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model config {self.name!r}: {key}={getattr(self, key)} must be positive.")
        if self.attention_head_dim is None and self.mla is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"model config {self.name!r}: n_embd={self.n_embd} must be divisible by n_head={self.n_head}."
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"model config {self.name!r}: n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}."
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model config {self.name!r}: sliding_window={self.sliding_window} must be positive.")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer:
                raise ConfigError(
                    f"model config {self.name!r}: layer_types lists {len(self.layer_types)} layers, the model has "
                    f"{self.n_layer}."
                )
            unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
            if unknown:
                raise ConfigError(
                    f"model config {self.name!r}: layer type {sorted(unknown)[0]!r} is not one of "
                    f"{FULL_ATTENTION}, {SLIDING_ATTENTION}."
                )

    # Derived shapes -----------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head if self.attention_head_dim is None else self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @property
    def qkv_dim(self) -> int:
        """Width of a fused QKV projection: all query heads plus K and V for the KV heads."""
        return (self.n_head + 2 * self.kv_heads) * self.head_dim

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    # The KV cache's geometry ----------------------------------------------------------------------------------
    @property
    def cache_heads(self) -> int:
        """Heads one layer caches per token: the KV heads, or one latent under MLA."""
        return 1 if self.mla is not None else self.kv_heads

    @property
    def cache_head_dim(self) -> int:
        """Elements of one cached head row: head_dim, or the MLA latent (kv_lora_rank + qk_rope_head_dim)."""
        return self.mla.latent_dim if self.mla is not None else self.head_dim

    @property
    def cache_tensors(self) -> int:
        """Cached tensors per layer: K and V (2), or the MLA latent alone (1)."""
        return 1 if self.mla is not None else 2

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window: the sliding window, or None where a layer attends to every position."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.n_layer
        return tuple(self.sliding_window if t == SLIDING_ATTENTION else None for t in self.layer_types)

    @property
    def hybrid_attention(self) -> bool:
        """Whether windowed layers alternate with layers that attend to everything (gemma2, gemma3)."""
        return len(set(self.layer_windows)) > 1

    # Parameters ---------------------------------------------------------------------------------------------
    def param_shapes(self, tp: int = 1) -> dict[str, tuple[int, ...]]:
        """Every parameter tensor on one of `tp` devices (kvspec.params); GPT-2 keeps Hugging Face GPT-2's names,
        with `h.{i}` for each block; other families use transformers' parameter names."""
        from kvspec.params import param_shapes

        return param_shapes(self, tp)

    @property
    def param_count(self) -> int:
        """Exact parameter count from the shapes; a tied embedding is counted once."""
        total = 0
        for shape in self.param_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# Parameter counts (tied embedding counted once): 124,439,808 / 354,823,168 / 774,030,080 / 1,557,611,200.
PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig("gpt2", n_embd=768, n_layer=12, n_head=12),  # 124M
    "gpt2-medium": ModelConfig("gpt2-medium", n_embd=1024, n_layer=24, n_head=16),  # 355M
    "gpt2-large": ModelConfig("gpt2-large", n_embd=1280, n_layer=36, n_head=20),  # 774M
    "gpt2-xl": ModelConfig("gpt2-xl", n_embd=1600, n_layer=48, n_head=25),  # 1.5B
}


def family_presets() -> list[str]:
    """Names of the packaged public configs (kvspec/presets/*.json): shapes only, no weights."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_names() -> list[str]:
    return [*PRESETS, *family_presets()]


def config_from_hf(path: str | Path) -> ModelConfig:
    """Read a Hugging Face `config.json` (a file, or a directory holding one); see kvspec.hf_config."""
    from kvspec.hf_config import config_from_hf as read

    return read(path)


def load_config(name_or_dir: str | Path) -> ModelConfig:
    """A preset by name (`gpt2`, ..., `llama-3.1-8b`, ...) or a checkpoint directory's config.json."""
    key = str(name_or_dir)
    if key in PRESETS:
        return PRESETS[key]
    packaged = PRESET_DIR / f"{key}.json"
    if "/" not in key and packaged.is_file():
        return config_from_hf(packaged).replace(name=key, preset=True)
    path = Path(key)
    if path.exists():
        return config_from_hf(path)
    raise ConfigError(
        f"unknown model {key!r}: use a preset ({', '.join(preset_names())}) or a directory holding a Hugging Face "
        "config.json."
    )


def read_json_object(path: Path) -> dict:
    """A config file's JSON object, or one ConfigError sentence."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): fix or replace the file.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object of model settings.")
    return raw
