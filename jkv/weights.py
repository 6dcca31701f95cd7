"""Weights for jkv's models: `load_model`, Hugging Face checkpoints, random presets, orbax save/restore.

Families: GPT-2 (`jkv.model`) and the Llama family, llama / mistral / qwen2 / qwen3 (`jkv.llama`).

A Hugging Face directory holds `config.json` and one of `model.safetensors`, `model.safetensors.index.json`
(sharded) or (GPT-2) `flax_model.msgpack`; jkv's own converted form (`scripts/convert.py`) holds `config.json`
and an orbax checkpoint in `params/`. Every tensor is checked against the shapes `config.json` implies before any
is loaded: a missing, unexpected or mis-shaped tensor is a `CheckpointError` that names it and both shapes.
Tensors then stream onto the device one at a time (the host holds one tensor, never the model). End-of-sequence
ids come from `generation_config.json`, else config.json. Nothing is ever downloaded.

Layouts (the one place they are handled):
- torch GPT-2 `Conv1D` weights (`c_attn`, `c_proj`, `c_fc`) are stored [in, out], the same as a Flax Dense
  kernel: copied as they are. Hugging Face's *Flax* GPT-2 stores those kernels [out, in] (its FlaxConv1D
  transposes at use), and its untied `lm_head` kernel [in, out]: every Flax `kernel` is transposed on load.
- `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` (GPT-2) and `rotary_emb.inv_freq` (older Llama exports) are
  buffers, not weights: ignored.
- Llama-family weights keep torch's [out, in] layout (`jkv.llama.linear` contracts the input dimension).
- `lm_head.weight` next to a tied embedding must equal the embedding and is then dropped.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jkv.model import Model, Params
from kvspec.config import (
    PRESET_DIR,
    PRESETS,
    ConfigError,
    ModelConfig,
    config_from_hf,
    family_presets,
    load_config,
    read_json_object,
)
from kvspec.hf_config import SUPPORTED_MODEL_TYPES

DTYPES = ("float32", "bfloat16", "float16")
SERVED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
ORBAX_DIR = "params"  # jkv's converted checkpoints: DIR/config.json + DIR/params/ (orbax)
_BUFFER = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq)$")
_HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation


class CheckpointError(ValueError):
    """A checkpoint directory jkv cannot load; the message says which file or tensor and what to do."""


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """ "float32" / "bfloat16" / "float16" (or the matching dtype object) as a jnp.dtype; else ValueError."""
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)}.")
    return jnp.dtype(name)


# Names ------------------------------------------------------------------------------------------------------
def embedding_name(config: ModelConfig) -> str:
    """The token embedding's Hugging Face tensor name (the one a tied lm-head must equal)."""
    return "wte.weight" if config.model_type == "gpt2" else "model.embed_tokens.weight"


def hf_tensor_names(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Hugging Face tensor name (torch layout, no `transformer.` prefix) -> (jkv parameter path, shape).

    The shapes are the same on both sides: Conv1D's [in, out] is a Flax Dense kernel's layout, and the Llama
    family keeps torch's [out, in].
    """
    if config.model_type != "gpt2":
        from jkv.llama import param_path

        return {name: (param_path(name), shape) for name, shape in config.param_shapes().items()}
    out = {}
    for key, shape in config.param_shapes().items():
        if key in ("wte", "wpe"):
            out[f"{key}.weight"] = ((key, "embedding"), shape)
        elif key == "lm_head":
            out["lm_head.weight"] = (
                ("lm_head",),
                shape,
            )  # torch nn.Linear [out, in] = [V, E], as jkv keeps it
        else:
            parts = key.split(".")
            if parts[0] == "h":
                parts = [f"h_{parts[1]}", *parts[2:]]
            module, leaf = parts[:-1], parts[-1]
            leaf = "bias" if leaf == "bias" else ("scale" if module[-1].startswith("ln_") else "kernel")
            out[key] = ((*module, leaf), shape)
    return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def flatten_params(params: Params) -> dict[str, Any]:
    """{"h_0/attn/c_attn/kernel": array, ...}: the parameter pytree with "/"-joined paths."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(str(getattr(p, "key", p)) for p in path)] = leaf
    return flat


# Random weights for the presets -----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, std: jax.Array) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def random_params(config: ModelConfig, dtype: Any = "float32", seed: int = 0) -> Params:
    """Hugging Face's initialisation, drawn straight on the device one tensor at a time (no init trace).

    GPT-2: weights N(0, 0.02); the residual projections (`attn/c_proj`, `mlp/c_proj`) N(0, 0.02 / sqrt(2
    n_layer)); biases 0; LayerNorm scales 1. Llama family: matrices N(0, 0.02), norms 1, biases 0.
    """
    dt = resolve_dtype(dtype)
    key = jax.random.key(seed)
    params: Params = {}
    resid_std = 0.02 / np.sqrt(2 * config.n_layer)
    for i, (name, (path, shape)) in enumerate(hf_tensor_names(config).items()):
        if path[-1] == "bias":
            value = jnp.zeros(shape, dt)
        elif path[-1] == "scale" or name.endswith("norm.weight"):
            value = jnp.ones(shape, dt)
        else:
            std = resid_std if name.endswith("c_proj.weight") else 0.02
            value = _normal(jax.random.fold_in(key, i), shape, dt, jnp.float32(std))
        _set(params, path, value)
    return params


# Hugging Face checkpoints -----------------------------------------------------------------------------------
def load_hf_config(path: str | Path) -> ModelConfig:
    """The directory's config.json as a ModelConfig, refusing options jkv's models do not reproduce."""
    path = Path(path)
    where = path / "config.json"
    if where.is_file():
        model_type = read_json_object(where).get("model_type")
        if model_type in SUPPORTED_MODEL_TYPES and model_type not in SERVED_MODEL_TYPES:
            raise CheckpointError(refuse_family(model_type, str(where)))
    config = config_from_hf(path)
    raw = json.loads(where.read_text())
    if config.model_type != "gpt2":
        check_served(config, str(where))
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{where}: hidden_act={act!r} is not supported: jkv's Llama family uses silu.")
        return config
    act = raw.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise CheckpointError(
            f"{where}: activation_function={act!r} is not supported; jkv's GPT-2 uses gelu_new."
        )
    for flag, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):  # fmt: skip
        if bool(raw.get(flag, want)) != want:
            raise CheckpointError(
                f"{where}: {flag}={raw[flag]!r} is not supported by jkv's GPT-2; it needs {want}."
            )
    if config.sliding_window is not None:
        raise CheckpointError(f"{where}: sliding_window is not implemented by jkv's GPT-2; remove it.")
    return config


def refuse_family(model_type: str, where: str) -> str:
    """The one sentence for a family the planner knows but jkv's model does not run yet."""
    return (
        f"{where}: model_type={model_type!r} is planned by `jkv plan --model` but jkv's engine serves "
        f"{', '.join(SERVED_MODEL_TYPES)} only so far: plan it with `jkv plan`, or serve one of those."
    )


def check_served(config: ModelConfig, where: str) -> None:
    """Raise CheckpointError unless jkv's engine runs this config exactly (family, windows, rotary scaling)."""
    from jkv.llama import check_config

    if config.model_type == "gpt2":
        return
    try:
        check_config(config, where)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json for `config` (what `load_hf_config` reads back to an equal config)."""
    if config.model_type != "gpt2":
        return _llama_config_to_hf(config)
    raw = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "_name_or_path": config.name,
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    if config.n_kv_head is not None:
        raw["n_kv_head"] = config.n_kv_head
    return raw


def _llama_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model_type": config.model_type,
        "_name_or_path": config.name,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.n_positions,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.layer_norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta if config.rope_theta is not None else 10000.0,
    }
    if config.rope_scaling:  # as config.json gave it: transformers 5's rope_parameters or 4's rope_scaling
        raw["rope_parameters"] = dict(config.rope_scaling)
    if config.model_type == "llama":
        raw["attention_bias"], raw["mlp_bias"] = config.attention_bias, config.mlp_bias
    if config.sliding_window is not None:
        raw["sliding_window"] = config.sliding_window
        if config.model_type.startswith("qwen"):
            raw["use_sliding_window"], raw["max_window_layers"] = True, 0
    if config.weight_dtype:
        raw["torch_dtype"] = config.weight_dtype
    return raw


class _Tensors:
    """A checkpoint's tensors by Hugging Face name: shapes known up front, values read one at a time."""

    def __init__(self, where: str, shapes: dict[str, tuple[int, ...]], read: Callable[[str], Any]) -> None:
        self.where, self.shapes, self.read = where, shapes, read


def _strip(name: str) -> str:
    return name.removeprefix("transformer.")


def _safetensors(files: list[Path], where: str) -> _Tensors:
    from safetensors import safe_open

    location: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(
                f"{file} is listed in {where} but missing: copy the whole checkpoint directory."
            )
        with safe_open(file, framework="flax") as f:
            for raw in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                location[_strip(raw)] = (file, raw)
                shapes[_strip(raw)] = tuple(f.get_slice(raw).get_shape())

    def read(name: str) -> Any:
        file, raw = location[name]
        with safe_open(file, framework="flax") as f:
            return f.get_tensor(raw)

    return _Tensors(where, shapes, read)


def _flax_msgpack(file: Path) -> _Tensors:
    from flax import serialization

    tree = serialization.msgpack_restore(file.read_bytes())
    arrays: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
            return
        name = _strip(prefix[:-1])
        stem, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if leaf == "kernel":  # HF Flax: FlaxConv1D kernels are [out, in]; lm_head Dense kernel is [E, V]
            node, leaf = np.asarray(node).T, "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        arrays[f"{stem}.{leaf}" if stem else leaf] = np.asarray(node)

    walk(tree, "")
    return _Tensors(str(file), {k: tuple(v.shape) for k, v in arrays.items()}, arrays.__getitem__)


def _check(tensors: _Tensors, config: ModelConfig) -> None:
    expected = hf_tensor_names(config)
    problems = []
    for name, (_, shape) in expected.items():
        if name not in tensors.shapes:
            problems.append(f"tensor {name!r} (expected shape {shape}) is missing")
        elif tensors.shapes[name] != shape:
            problems.append(
                f"tensor {name!r} has shape {tensors.shapes[name]} where config.json implies {shape}"
            )
    for name, shape in tensors.shapes.items():
        if (
            name in expected
            or _BUFFER.match(name)
            or (name == "lm_head.weight" and config.tie_word_embeddings)
        ):
            continue
        problems.append(f"tensor {name!r} (shape {shape}) is not part of this {config.model_type} model (no "
                        "expected shape)")  # fmt: skip
    lm_head, wte_shape = tensors.shapes.get("lm_head.weight"), expected[embedding_name(config)][1]
    if config.tie_word_embeddings and lm_head is not None and lm_head != wte_shape:
        problems.append(
            f"tensor 'lm_head.weight' has shape {lm_head} where the tied embedding implies {wte_shape}"
        )
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{tensors.where}: {problems[0]}{more}; the weights do not match config.json, so fix config.json "
            "or re-export the checkpoint."
        )


def _load_tensors(tensors: _Tensors, config: ModelConfig, dtype: jnp.dtype) -> Params:
    """Every tensor onto the default device, one at a time, cast there: the host never holds two."""
    _check(tensors, config)
    embed = embedding_name(config)
    if (
        config.tie_word_embeddings
        and "lm_head.weight" in tensors.shapes
        and not np.array_equal(np.asarray(tensors.read("lm_head.weight")), np.asarray(tensors.read(embed)))
    ):
        raise CheckpointError(
            f"{tensors.where}: tensor 'lm_head.weight' differs from {embed!r} although config.json sets "
            "tie_word_embeddings=true; set it to false in config.json."
        )
    params: Params = {}
    for name, (path, _) in hf_tensor_names(config).items():
        _set(params, path, _to_device(tensors.read(name), dtype))
    return params


def _to_device(value: Any, dtype: jnp.dtype) -> jax.Array:
    array = jnp.asarray(value)  # safetensors' flax reader already returns a device array; numpy is copied once
    return array if array.dtype == dtype else array.astype(dtype)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack", f"{ORBAX_DIR}/")


def load_params(path: str | Path, config: ModelConfig, dtype: Any = "float32") -> Params:
    """The parameters of checkpoint directory `path` (any form in WEIGHT_FILES), checked against `config`."""
    path, dt = Path(path), resolve_dtype(dtype)
    if (path / "model.safetensors").is_file():
        return _load_tensors(
            _safetensors([path / "model.safetensors"], str(path / "model.safetensors")), config, dt
        )
    if (path / "model.safetensors.index.json").is_file():
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return _load_tensors(_safetensors([path / f for f in files], str(index)), config, dt)
    if (path / "flax_model.msgpack").is_file():
        return _load_tensors(_flax_msgpack(path / "flax_model.msgpack"), config, dt)
    if (path / ORBAX_DIR).is_dir():
        return restore_orbax(path, config, dt)
    hint = ""
    if (path / "pytorch_model.bin").is_file():
        hint = " It has pytorch_model.bin, which jkv cannot read without torch: re-save it with safetensors."
    raise CheckpointError(
        f"{path} holds no weights jkv can read (looked for {', '.join(WEIGHT_FILES)}): point at a Hugging Face "
        f"checkpoint directory.{hint}"
    )


# orbax ------------------------------------------------------------------------------------------------------
def save_orbax(params: Params, config: ModelConfig, out: str | Path) -> Path:
    """Write `out/config.json` and the parameters as an orbax checkpoint in `out/params/`; `load_model(out)` reads it."""
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    if (out / ORBAX_DIR).exists():
        raise ValueError(f"{out / ORBAX_DIR} already exists: choose a new output directory or delete it.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / ORBAX_DIR, params)
    return out


def restore_orbax(path: str | Path, config: ModelConfig, dtype: Any = "float32") -> Params:
    """Parameters from `path/params/` (written by `save_orbax`), checked against `config`, cast to `dtype`."""
    import orbax.checkpoint as ocp

    ckpt = Path(path).absolute() / ORBAX_DIR
    dt = resolve_dtype(dtype)
    names = {"/".join(p): name for name, (p, _) in hf_tensor_names(config).items()}
    with ocp.StandardCheckpointer() as ckptr:
        meta = flatten_params(ckptr.metadata(ckpt).item_metadata.tree)
        # The tree is keyed by jkv paths; check it under Hugging Face names so the messages match the other forms
        # (a path jkv does not know keeps its own name).
        _check(_Tensors(str(ckpt), {names.get(k, k): tuple(v.shape) for k, v in meta.items()}, None), config)
        target: Params = {}
        for p, shape in hf_tensor_names(config).values():
            _set(target, p, jax.ShapeDtypeStruct(shape, dt))
        return ckptr.restore(ckpt, target)


def save_safetensors(params: Params, config: ModelConfig, out: str | Path) -> Path:
    """Write a Hugging Face GPT-2 directory (`config.json` + `model.safetensors`, torch layout, tied lm_head left out)."""
    from safetensors.flax import save_file

    out = Path(out)
    if (out / "model.safetensors").exists():
        raise ValueError(
            f"{out / 'model.safetensors'} already exists: choose a new output directory or delete it."
        )
    out.mkdir(parents=True, exist_ok=True)
    flat = flatten_params(params)
    tensors = {name: jnp.asarray(flat["/".join(path)]) for name, (path, _) in hf_tensor_names(config).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    return out


# load_model -------------------------------------------------------------------------------------------------
def eos_token_ids(*files: Path) -> tuple[int, ...]:
    """End-of-sequence ids: the first of `files` that exists and names `eos_token_id` (an id or a list)."""
    for file in files:
        if file.is_file():
            value = read_json_object(file).get("eos_token_id")
            if value is None:
                continue
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise CheckpointError(f"{file}: eos_token_id={value!r} must be a token id or a list of them.")
            return tuple(ids)
    return ()


def default_dtype(config: ModelConfig) -> str:
    """The weight dtype a model loads in when none is asked: config.json's torch_dtype, else float32."""
    return config.weight_dtype if config.weight_dtype in DTYPES else "float32"


def load_model(name_or_dir: str | Path, dtype: str | None = None, *, seed: int = 0) -> Model:
    """A model by preset name (random weights, with a warning) or from a checkpoint directory.

    Presets: gpt2, gpt2-medium, gpt2-large, gpt2-xl, and the Llama-family shapes (llama-3.1-8b, llama-3.2-1b,
    mistral-7b, qwen2.5-1.5b, qwen3-8b, ...). A directory: config.json plus model.safetensors (or a sharded index,
    GPT-2's flax_model.msgpack, or jkv's orbax `params/`). `dtype` is the weight and compute dtype: float32,
    bfloat16 or float16; None takes config.json's torch_dtype (float32 where it names none). A directory with a
    config.json wins over a preset of the same name.
    """
    key = str(name_or_dir)
    path = Path(key)
    if (path / "config.json").is_file():
        config = load_hf_config(path)
        dt = resolve_dtype(dtype or default_dtype(config))
        eos = eos_token_ids(path / "generation_config.json", path / "config.json")
        return Model(config, load_params(path, config, dt), dt, key, eos)
    if key in PRESETS or key in family_presets():
        config = PRESETS[key] if key in PRESETS else load_config(key)
        check_served(config, key)
        dt = resolve_dtype(dtype or default_dtype(config))
        warnings.warn(
            f"jkv: {key} has RANDOM weights (no checkpoint was given), so its text is meaningless; pass a Hugging "
            "Face checkpoint directory for real weights.",
            stacklevel=2,
        )
        eos = () if key in PRESETS else eos_token_ids(PRESET_DIR / f"{key}.json")
        return Model(config, random_params(config, dt, seed), dt, key, eos)
    if path.is_dir():
        raise CheckpointError(f"{path} has no config.json: point at a Hugging Face checkpoint directory.")
    served = [*PRESETS, *(p for p in family_presets() if load_config(p).model_type in SERVED_MODEL_TYPES)]
    raise ValueError(f"unknown model {key!r}: use one of {', '.join(served)} or a checkpoint directory.")

