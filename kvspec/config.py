"""Model shapes every part of jkv works from: the GPT-2 presets and Hugging Face `config.json` files.

Pure Python: no JAX, no device. `ModelConfig` is the one description of a decoder's shape that the planner, the
model, the engine and the kernels use; derived figures (head size, parameter count) are properties, never stored
twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A model config, KV dtype or layout setting that jkv cannot use; the message says what to do.

    The planner raises the same class as `planner.PlanError` (an alias, not a subclass), so one `except` catches
    both.
    """


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a GPT-2-style decoder (learned positions, pre-LayerNorm, GELU MLP, tied embedding).

    `n_kv_head` below `n_head` describes grouped-query (or, at 1, multi-query) attention variants;
    `sliding_window` limits attention to the last W positions.
    """

    name: str
    vocab_size: int = 50257
    n_positions: int = 1024  # the longest context the learned position table covers
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: same as n_head (multi-head attention)
    n_inner: int | None = None  # None: 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"model config {self.name!r}: {field}={getattr(self, field)} must be positive.")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model config {self.name!r}: n_embd={self.n_embd} must be divisible by n_head={self.n_head}."
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"model config {self.name!r}: n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}."
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model config {self.name!r}: sliding_window={self.sliding_window} must be positive.")

    # Derived shapes -----------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @property
    def qkv_dim(self) -> int:
        """Width of the fused QKV projection: all query heads plus K and V for the KV heads."""
        return self.n_embd + 2 * self.kv_heads * self.head_dim

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter tensor with Hugging Face GPT-2's names; `h.{i}` stands for each of the n_layer blocks."""
        e, f, q = self.n_embd, self.mlp_dim, self.qkv_dim
        shapes = {"wte": (self.vocab_size, e), "wpe": (self.n_positions, e)}
        block = {
            "ln_1.weight": (e,), "ln_1.bias": (e,),
            "attn.c_attn.weight": (e, q), "attn.c_attn.bias": (q,),  # Conv1D: stored [in, out]
            "attn.c_proj.weight": (e, e), "attn.c_proj.bias": (e,),
            "ln_2.weight": (e,), "ln_2.bias": (e,),
            "mlp.c_fc.weight": (e, f), "mlp.c_fc.bias": (f,),
            "mlp.c_proj.weight": (f, e), "mlp.c_proj.bias": (e,),
        }  # fmt: skip
        for i in range(self.n_layer):
            shapes.update({f"h.{i}.{k}": v for k, v in block.items()})
        shapes["ln_f.weight"] = (e,)
        shapes["ln_f.bias"] = (e,)
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.vocab_size, e)
        return shapes

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


def _hf_int(raw: dict, path: Path, *keys: str, default: int | None = None) -> int | None:
    for key in keys:
        if key in raw and raw[key] is not None:
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{path}: {key}={value!r} must be an integer.")
            return value
    return default


def config_from_hf(path: str | Path) -> ModelConfig:
    """Read a Hugging Face GPT-2-style `config.json` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path.parent} has no config.json: point --model at a Hugging Face GPT-2 checkpoint directory.")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): fix or replace the file.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object of model settings.")
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ConfigError(f"{path}: model_type={model_type!r} is not supported; jkv plans GPT-2-style models only.")
    n_head = _hf_int(raw, path, "n_head", "num_attention_heads", default=12)
    return ModelConfig(
        name=str(raw.get("_name_or_path") or path.parent.name),
        vocab_size=_hf_int(raw, path, "vocab_size", default=50257),
        n_positions=_hf_int(raw, path, "n_positions", "max_position_embeddings", default=1024),
        n_embd=_hf_int(raw, path, "n_embd", "hidden_size", default=768),
        n_layer=_hf_int(raw, path, "n_layer", "num_hidden_layers", default=12),
        n_head=n_head,
        n_kv_head=_hf_int(raw, path, "n_kv_head", "num_key_value_heads", default=None),
        n_inner=_hf_int(raw, path, "n_inner", "intermediate_size", default=None),
        layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        sliding_window=_hf_int(raw, path, "sliding_window", default=None),
    )


def load_config(name_or_dir: str | Path) -> ModelConfig:
    """A preset by name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) or a checkpoint directory's config."""
    key = str(name_or_dir)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key)
    if path.exists():
        return config_from_hf(path)
    raise ConfigError(
        f"unknown model {key!r}: use one of {', '.join(PRESETS)} or a directory holding a GPT-2 config.json."
    )
