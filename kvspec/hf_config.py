"""Reading a Hugging Face `config.json` into a `ModelConfig`, family by family, as transformers 4.x and 5.x write it.

Each family names the keys it needs; a missing one is named in the error, never guessed. Optional keys take
transformers' own defaults for that family (what `AutoConfig` would fill in), so a config planned here is the
model transformers would build. Pure Python: no JAX, no device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvspec.config import (
    FULL_ATTENTION, SLIDING_ATTENTION, ConfigError, MLAConfig, ModelConfig, MoEConfig, VisionConfig, freeze,
    read_json_object,
)  # fmt: skip

GPT_STYLE = ("gpt2", "gpt_neox", "falcon")
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3_text")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
MLA = ("deepseek_v2", "deepseek_v3")
SUPPORTED_MODEL_TYPES = GPT_STYLE + LLAMA_STYLE + MOE + MLA

# What a user can add to a config of an unsupported family whose blocks are GPT-2- or Llama-shaped.
_PLANNABLE_HINT = (
    "for a Llama-shaped decoder set model_type='llama' with hidden_size, intermediate_size, num_hidden_layers, "
    "num_attention_heads, num_key_value_heads, vocab_size and max_position_embeddings (head_dim if it is not "
    "hidden_size / num_attention_heads); for a GPT-2-shaped one model_type='gpt2' with n_embd, n_layer, n_head, "
    "vocab_size and n_positions"
)


class _Keys:
    """Typed access to one config's keys; every error names the file and the key."""

    def __init__(self, raw: dict, where: str) -> None:
        self.raw, self.where = raw, where

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def int(self, *keys: str, default: Any = ConfigError) -> Any:
        for key in keys:
            if self.has(key):
                value = self.raw[key]
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigError(f"{self.where}: {key}={value!r} must be an integer.")
                if value < 0:
                    raise ConfigError(f"{self.where}: {key}={value} must not be negative.")
                return value
        if default is ConfigError:
            raise ConfigError(f"{self.where} has no {keys[0]}: add it (the model's {_DESCRIBE.get(keys[0], keys[0])}).")
        return default

    def float(self, key: str, default: float | None) -> float | None:
        if not self.has(key):
            return default
        value = self.raw[key]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{self.where}: {key}={value!r} must be a number.")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.raw[key]
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: {key}={value!r} must be true or false.")
        return value


_DESCRIBE = {
    "hidden_size": "residual width", "n_embd": "residual width", "num_hidden_layers": "number of layers",
    "n_layer": "number of layers", "num_attention_heads": "number of query heads", "n_head": "number of query heads",
    "intermediate_size": "MLP width", "vocab_size": "vocabulary size",
    "max_position_embeddings": "longest context", "kv_lora_rank": "MLA latent rank",
    "qk_rope_head_dim": "rotary key size", "moe_intermediate_size": "expert MLP width",
}  # fmt: skip


def config_from_hf(path: str | Path) -> ModelConfig:
    """Read a Hugging Face `config.json` (a file, or a directory holding one) of a supported family."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path.parent} has no config.json: point --model at a Hugging Face checkpoint directory.")
    raw = read_json_object(path)
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(
            f"{path} has no model_type: add it ({', '.join(SUPPORTED_MODEL_TYPES)}); jkv never guesses a family."
        )
    if model_type not in _PARSERS:
        raise ConfigError(
            f"{path}: model_type={model_type!r} is not supported; jkv plans {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"({_PLANNABLE_HINT})."
        )
    name = str(raw.get("_name_or_path") or path.parent.name)
    return _PARSERS[model_type](_Keys(raw, str(path)), name)


def _common(k: _Keys, *, mla: bool = False) -> dict:
    """The keys every Llama-style family shares (MLA has no per-head K/V size to check)."""
    n_head = k.int("num_attention_heads")
    hidden = k.int("hidden_size")
    head_dim = None if mla else k.int("head_dim", default=None)
    if not mla and head_dim is None and n_head and hidden % n_head:
        raise ConfigError(
            f"{k.where}: hidden_size={hidden} is not divisible by num_attention_heads={n_head}; fix one, or give "
            "head_dim."
        )
    if head_dim is not None and head_dim * n_head == hidden:
        head_dim = None  # the implied size: keep one spelling of the same shape
    n_kv = k.int("num_key_value_heads", default=None)
    if n_kv is not None and n_kv and n_head % n_kv:
        raise ConfigError(
            f"{k.where}: num_attention_heads={n_head} is not a multiple of num_key_value_heads={n_kv}."
        )
    rope = k.raw.get("rope_parameters") or k.raw.get("rope_scaling") or {}
    theta = k.float("rope_theta", None)
    if theta is None and isinstance(rope, dict):
        theta = rope.get("rope_theta") if isinstance(rope.get("rope_theta"), int | float) else None
    dtype = k.raw.get("torch_dtype") or k.raw.get("dtype")
    return dict(
        vocab_size=k.int("vocab_size"),
        n_positions=k.int("max_position_embeddings"),
        n_embd=hidden,
        n_layer=k.int("num_hidden_layers"),
        n_head=n_head,
        n_kv_head=n_kv if n_kv != n_head else None,
        attention_head_dim=head_dim,
        layer_norm_epsilon=k.float("rms_norm_eps", 1e-6),
        rope_theta=None if theta is None else float(theta),
        rope_scaling=freeze(rope) if isinstance(rope, dict) else (),
        weight_dtype=dtype if isinstance(dtype, str) else None,
    )


def _gpt2(k: _Keys, name: str) -> ModelConfig:
    n_head = k.int("n_head", "num_attention_heads")
    return ModelConfig(
        name=name,
        vocab_size=k.int("vocab_size"),
        n_positions=k.int("n_positions", "max_position_embeddings"),
        n_embd=k.int("n_embd", "hidden_size"),
        n_layer=k.int("n_layer", "num_hidden_layers"),
        n_head=n_head,
        n_kv_head=k.int("n_kv_head", "num_key_value_heads", default=None),
        n_inner=k.int("n_inner", "intermediate_size", default=None),
        layer_norm_epsilon=k.float("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=k.bool("tie_word_embeddings", True),
        sliding_window=k.int("sliding_window", default=None),
        weight_dtype=k.raw.get("torch_dtype") or k.raw.get("dtype"),
    )


def _gpt_neox(k: _Keys, name: str) -> ModelConfig:
    c = _common(k)
    c["layer_norm_epsilon"] = k.float("layer_norm_eps", 1e-5)
    return ModelConfig(name=name, model_type="gpt_neox", n_inner=k.int("intermediate_size"),
                       tie_word_embeddings=k.bool("tie_word_embeddings", False),
                       attention_bias=k.bool("attention_bias", True), **c)  # fmt: skip


def _falcon(k: _Keys, name: str) -> ModelConfig:
    n_head = k.int("num_attention_heads", "n_head")
    hidden = k.int("hidden_size")
    if hidden % n_head:
        raise ConfigError(f"{k.where}: hidden_size={hidden} is not divisible by num_attention_heads={n_head}.")
    new_arch = k.bool("new_decoder_architecture", False)
    if new_arch:
        n_kv = k.int("num_kv_heads", default=n_head)
    else:
        n_kv = 1 if k.bool("multi_query", True) else n_head
    parallel = k.bool("parallel_attn", True)
    norms = k.int("num_ln_in_parallel_attn", default=2 if new_arch else None)
    return ModelConfig(
        name=name, model_type="falcon", vocab_size=k.int("vocab_size"),
        n_positions=k.int("max_position_embeddings", default=2048),
        n_embd=hidden, n_layer=k.int("num_hidden_layers", "n_layer"), n_head=n_head,
        n_kv_head=n_kv if n_kv != n_head else None, n_inner=k.int("ffn_hidden_size", default=4 * hidden),
        layer_norm_epsilon=k.float("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=k.bool("tie_word_embeddings", True), attention_bias=k.bool("bias", False),
        mlp_bias=k.bool("bias", False), weight_dtype=k.raw.get("torch_dtype") or k.raw.get("dtype"),
        options=(("new_decoder_architecture", new_arch), ("norms", "post" if not parallel else
                 ("attn+mlp" if norms == 2 else "input"))),
    )  # fmt: skip


def _llama_family(model_type: str) -> Callable[[_Keys, str], ModelConfig]:
    def parse(k: _Keys, name: str) -> ModelConfig:
        if model_type == "gemma3":
            return _gemma3(k, name)
        c = _common(k)
        layer_types, window = _layer_types(k, model_type, c["n_layer"])
        bias = {"qwen2": True, "mistral": False, "phi3": False}.get(model_type, k.bool("attention_bias", False))
        return ModelConfig(
            name=name, model_type=model_type, n_inner=k.int("intermediate_size"),
            tie_word_embeddings=k.bool("tie_word_embeddings", model_type in ("gemma2", "gemma3_text")),
            sliding_window=window, layer_types=layer_types, attention_bias=bias,
            mlp_bias=k.bool("mlp_bias", False) if model_type == "llama" else False,
            qk_norm=model_type in ("qwen3", "gemma3_text"), **c,
        )  # fmt: skip

    return parse


def _layer_types(k: _Keys, model_type: str, n_layer: int) -> tuple[tuple[str, ...] | None, int | None]:
    """(layer_types, window) as transformers builds them: None when every layer is alike."""
    window = k.int("sliding_window", default=4096 if model_type in ("gemma2", "gemma3_text") else None) or None
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not k.bool("use_sliding_window", False):
        window = None  # qwen configs carry a sliding_window that only use_sliding_window turns on
    given = k.raw.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or not all(isinstance(t, str) for t in given):
            raise ConfigError(f"{k.where}: layer_types must be a list of layer type names.")
        types = tuple(given)
    elif model_type == "gemma2":
        types = tuple(SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(n_layer))
    elif model_type == "gemma3_text":
        pattern = k.int("sliding_window_pattern", default=6)
        types = tuple(SLIDING_ATTENTION if pattern and (i + 1) % pattern else FULL_ATTENTION for i in range(n_layer))
    elif model_type.startswith("qwen") and window is not None:
        first = k.int("max_window_layers", default=28)
        types = tuple(SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(n_layer))
    else:
        return None, window
    if window is None:
        types = tuple(FULL_ATTENTION for _ in types)
    if len(set(types)) == 1:
        return None, window if types[0] == SLIDING_ATTENTION else None
    return types, window


def _gemma3(k: _Keys, name: str) -> ModelConfig:
    """A multimodal Gemma 3 checkpoint: its text_config is the decoder; its vision tower is resident weights."""
    text, vision = k.raw.get("text_config"), k.raw.get("vision_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{k.where}: a gemma3 config needs a text_config object (or model_type='gemma3_text').")
    tk = _Keys({"vocab_size": 262208, "max_position_embeddings": 131072, "head_dim": 256,
                "num_key_value_heads": 4, **text}, f"{k.where} text_config")  # fmt: skip
    config = _llama_family("gemma3_text")(tk, name)
    tower = None
    if isinstance(vision, dict):
        vk = _Keys(vision, f"{k.where} vision_config")
        tower = VisionConfig(
            hidden=vk.int("hidden_size", default=768), intermediate=vk.int("intermediate_size", default=3072),
            layers=vk.int("num_hidden_layers", default=12), patch_size=vk.int("patch_size", default=16),
            image_size=vk.int("image_size", default=224), channels=vk.int("num_channels", default=3),
            use_head=vk.bool("vision_use_head", True),
        )  # fmt: skip
    dtype = k.raw.get("torch_dtype") or k.raw.get("dtype") or config.weight_dtype
    return config.replace(model_type="gemma3", vision=tower, weight_dtype=dtype,
                          tie_word_embeddings=k.bool("tie_word_embeddings", True))  # fmt: skip


def _moe_family(model_type: str) -> Callable[[_Keys, str], ModelConfig]:
    def parse(k: _Keys, name: str) -> ModelConfig:
        c = _common(k)
        n = c["n_layer"]
        layer_types, window = _layer_types(k, model_type, n)
        if model_type == "mixtral":
            experts = k.int("num_local_experts", default=8)
            moe = MoEConfig(experts, k.int("num_experts_per_tok", default=2), k.int("intermediate_size"),
                            sparse_layers=(True,) * n)  # fmt: skip
            dense_dim = k.int("intermediate_size")
        else:
            experts = k.int("num_experts", "num_local_experts")
            step = k.int("decoder_sparse_step", default=1) or 1
            dense_only = k.raw.get("mlp_only_layers") or []
            if not isinstance(dense_only, list) or not all(isinstance(i, int) for i in dense_only):
                raise ConfigError(f"{k.where}: mlp_only_layers must be a list of layer indices.")
            sparse = tuple(i not in dense_only and experts > 0 and (i + 1) % step == 0 for i in range(n))
            shared = k.int("shared_expert_intermediate_size", default=0) if model_type == "qwen2_moe" else 0
            moe = MoEConfig(experts, k.int("num_experts_per_tok"), k.int("moe_intermediate_size"), shared,
                            shared_expert_gate=shared > 0, sparse_layers=sparse)  # fmt: skip
            dense_dim = k.int("intermediate_size")
        bias = k.bool("qkv_bias", True) if model_type == "qwen2_moe" else (
            k.bool("attention_bias", False) if model_type == "qwen3_moe" else False)  # fmt: skip
        return ModelConfig(
            name=name, model_type=model_type, n_inner=dense_dim, tie_word_embeddings=k.bool("tie_word_embeddings", False),
            sliding_window=window, layer_types=layer_types, attention_bias=bias, qk_norm=model_type == "qwen3_moe",
            moe=moe, **c,
        )  # fmt: skip

    return parse


def _deepseek(model_type: str) -> Callable[[_Keys, str], ModelConfig]:
    def parse(k: _Keys, name: str) -> ModelConfig:
        c = _common(k, mla=True)
        n = c["n_layer"]
        mla = MLAConfig(
            kv_lora_rank=k.int("kv_lora_rank"), qk_rope_head_dim=k.int("qk_rope_head_dim"),
            qk_nope_head_dim=k.int("qk_nope_head_dim"), v_head_dim=k.int("v_head_dim"),
            q_lora_rank=k.int("q_lora_rank", default=None),
        )  # fmt: skip
        first_dense = k.int("first_k_dense_replace", default=3 if model_type == "deepseek_v3" else 0)
        expert_dim = k.int("moe_intermediate_size")
        experts = k.int("n_routed_experts")
        moe = MoEConfig(
            experts, k.int("num_experts_per_tok", default=8 if model_type == "deepseek_v3" else None), expert_dim,
            shared_expert_dim=expert_dim * k.int("n_shared_experts", default=1),
            sparse_layers=tuple(i >= first_dense for i in range(n)),
        )  # fmt: skip
        c.update(n_kv_head=None, attention_head_dim=None)  # MLA: every query head reads the one latent
        return ModelConfig(
            name=name, model_type=model_type, n_inner=k.int("intermediate_size"),
            tie_word_embeddings=k.bool("tie_word_embeddings", False), attention_bias=k.bool("attention_bias", False),
            mlp_bias=k.bool("mlp_bias", False) if model_type == "deepseek_v2" else False, mla=mla, moe=moe,
            options=(("nextn_predict_layers", k.int("num_nextn_predict_layers", default=0)),), **c,
        )  # fmt: skip

    return parse


_PARSERS: dict[str, Callable[[_Keys, str], ModelConfig]] = {
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "falcon": _falcon,
    **{t: _llama_family(t) for t in LLAMA_STYLE},
    **{t: _moe_family(t) for t in MOE},
    **{t: _deepseek(t) for t in MLA},
}
