"""Hugging Face parity on a checkpoint written by transformers, every weight format, and every bad-weights error.

The fixture tests/fixtures/hf_tiny_gpt2/ comes from scripts/make_hf_fixture.py (transformers 5.24, torch 2.13
CPU): a 3-layer random GPT-2 (n_embd 32, 4 heads, vocab 1000) with large weights so attention is peaked, its
float64 logits for fixed ids and its greedy continuations from `generate(do_sample=False)`.
"""

import json
import shutil
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jkv
from jkv.weights import (
    CheckpointError,
    flatten_params,
    load_model,
    random_params,
    save_orbax,
    save_safetensors,
)
from kvspec.config import ModelConfig

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
HF_LOGITS = np.load(FIXTURE / "logits.npz")["logits"]  # float64 [T, V]

# Tolerances against HF's float64 logits, as a fraction of the largest |logit| (12.6 here). bfloat16 keeps 8
# mantissa bits, so weights alone move each logit by ~0.4 %; measured: bfloat16 2.4 %, float16 0.4 %.
REL_TOL = {"bfloat16": 0.05, "float16": 0.01}


@pytest.fixture(scope="module")
def model32():
    return load_model(FIXTURE)


def copy_fixture(tmp_path: Path, tensors: dict | None = None, drop_weights: bool = False) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(FIXTURE / "config.json", d / "config.json")
    if not drop_weights:
        if tensors is None:
            shutil.copy(FIXTURE / "model.safetensors", d / "model.safetensors")
        else:
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def fixture_tensors() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURE / "model.safetensors"))


# Parity -----------------------------------------------------------------------------------------------------
def test_float32_logits_match_hugging_face(model32):
    got = model32.logits(EXPECTED["ids"])
    diff = float(np.abs(got - HF_LOGITS).max())
    print(f"\nfloat32 vs HF float64 logits: max |diff| = {diff:.3g} (HF's own float32: "
          f"{EXPECTED['hf_float32_vs_float64_max_abs']:.3g})")  # fmt: skip
    assert diff < 1e-4
    assert isinstance(model32.config, jkv.weights.ModelConfig) and model32.dtype == np.float32
    assert model32.config.n_layer == 3 and model32.config.vocab_size == 1000


def test_greedy_tokens_match_hugging_face_generate(model32):
    n = len(EXPECTED["greedy"][0])
    assert jkv.reference_generate(model32, EXPECTED["prompts"], n) == EXPECTED["greedy"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_logits_within_documented_tolerance(dtype):
    model = load_model(FIXTURE, dtype=dtype)
    assert model.params["wte"]["embedding"].dtype == jnp.dtype(dtype)
    got = model.logits(EXPECTED["ids"])
    rel = float(np.abs(got - HF_LOGITS).max() / np.abs(HF_LOGITS).max())
    print(f"\n{dtype} vs HF float64 logits: max |diff| / max |logit| = {rel:.3g}")
    assert rel < REL_TOL[dtype]
    assert (got.argmax(-1) == HF_LOGITS.argmax(-1)).mean() >= 0.9


# Formats ----------------------------------------------------------------------------------------------------
def assert_same_params(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), err_msg=k)


def test_orbax_round_trip_and_back_to_safetensors(tmp_path, model32):
    out = save_orbax(model32.params, model32.config, tmp_path / "orbax")
    restored = load_model(out)
    assert restored.config == model32.config.replace(name=restored.config.name)
    assert_same_params(restored.params, model32.params)
    assert_same_params(load_model(out, dtype="bfloat16").params, load_model(FIXTURE, dtype="bfloat16").params)
    hf = save_safetensors(restored.params, restored.config, tmp_path / "hf")
    assert_same_params(load_model(hf).params, model32.params)
    with pytest.raises(ValueError, match="already exists"):
        save_orbax(model32.params, model32.config, out)


def test_convert_script_both_ways(tmp_path, capsys):
    import subprocess
    from types import SimpleNamespace

    def run_script(argv: list[str]) -> int:  # scripts/convert.py in a fresh process; its stderr echoed for capsys
        script = Path(__file__).parent.parent / "scripts" / "convert.py"
        proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, check=False)
        sys.stderr.write(proc.stderr)
        return proc.returncode

    convert = SimpleNamespace(main=run_script)
    assert convert.main([str(FIXTURE), str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "o" / "params").is_dir() and (tmp_path / "o" / "vocab.json").is_file()
    assert convert.main([str(tmp_path / "o"), str(tmp_path / "h")]) == 0
    assert (tmp_path / "h" / "model.safetensors").is_file()
    assert load_model(tmp_path / "h").logits([1, 2, 3]).shape == (3, 1000)
    assert convert.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_prefix_free_names_buffers_and_tied_lm_head(tmp_path, model32):
    t = {k.removeprefix("transformer."): v for k, v in fixture_tensors().items()}
    n_pos = model32.config.n_positions
    t["h.0.attn.bias"] = np.tril(np.ones((1, 1, n_pos, n_pos), np.float32))  # causal-mask buffer: ignored
    t["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    t["lm_head.weight"] = t["wte.weight"].copy()  # tied: equal to wte, dropped
    assert_same_params(load_model(copy_fixture(tmp_path, t)).params, model32.params)


def test_sharded_safetensors_index(tmp_path, model32):
    d = copy_fixture(tmp_path, drop_weights=True)
    t = fixture_tensors()
    names = sorted(t)
    save_file({k: t[k] for k in names[:20]}, str(d / "a.safetensors"))
    save_file({k: t[k] for k in names[20:]}, str(d / "b.safetensors"))
    weight_map = {k: ("a" if i < 20 else "b") + ".safetensors" for i, k in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_params(load_model(d).params, model32.params)


def test_hugging_face_flax_msgpack(tmp_path, model32):
    # Hugging Face's Flax GPT-2 layout: nested dicts under "transformer", FlaxConv1D kernels stored [out, in].
    from flax import serialization

    tree: dict = {}
    for name, value in fixture_tensors().items():
        parts = name.removeprefix("transformer.").split(".")
        leaf = parts[-1]
        if parts[0] in ("wte", "wpe"):
            leaf = "embedding"
        elif leaf == "weight" and parts[-2].startswith("ln_"):
            leaf = "scale"
        elif leaf == "weight":
            leaf, value = "kernel", value.T
        node = tree.setdefault("transformer", {})
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[leaf] = value
    d = copy_fixture(tmp_path, drop_weights=True)
    (d / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    assert_same_params(load_model(d).params, model32.params)


def test_random_presets_warn_and_have_gpt2_size():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = load_model("gpt2", dtype="bfloat16")
    assert sum(x.size for x in jax.tree.leaves(model.params)) == 124_439_808
    assert model.params["h_11"]["mlp"]["c_fc"]["kernel"].dtype == jnp.bfloat16
    std = float(jnp.std(model.params["h_0"]["attn"]["c_attn"]["kernel"].astype(jnp.float32)))
    assert 0.018 < std < 0.022  # HF's N(0, 0.02) init


def test_random_params_are_seeded():
    c = ModelConfig("t", vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    a, b, other = random_params(c, seed=1), random_params(c, seed=1), random_params(c, seed=2)
    assert_same_params(a, b)
    assert not np.array_equal(a["wte"]["embedding"], other["wte"]["embedding"])


# Errors a user can cause ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop("transformer.h.2.mlp.c_fc.bias"), r"'h\.2\.mlp\.c_fc\.bias' \(expected shape \(128,\)\) is missing"),
        (lambda t: t.update({"transformer.h.3.ln_1.weight": np.ones(32, np.float32)}),
         r"'h\.3\.ln_1\.weight' \(shape \(32,\)\) is not part of this gpt2 model"),
        (lambda t: t.update({"transformer.h.1.attn.c_attn.weight": np.zeros((96, 32), np.float32)}),
         r"'h\.1\.attn\.c_attn\.weight' has shape \(96, 32\) where config.json implies \(32, 96\)"),
        (lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}),
         r"'lm_head\.weight' differs from 'wte\.weight'.*tie_word_embeddings"),
        (lambda t: t.update({"lm_head.weight": np.zeros((1000, 31), np.float32)}),
         r"'lm_head\.weight' has shape \(1000, 31\) where the tied embedding implies \(1000, 32\)"),
    ],
    ids=["missing", "unexpected", "misshaped", "untied-lm-head", "misshaped-lm-head"],
)  # fmt: skip
def test_bad_tensors_are_named_with_both_shapes(tmp_path, edit, match):
    t = fixture_tensors()
    edit(t)
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(copy_fixture(tmp_path, t))
    assert "model.safetensors" in str(err.value)


def test_several_problems_are_counted(tmp_path):
    t = fixture_tensors()
    t.pop("transformer.ln_f.bias")
    t.pop("transformer.ln_f.weight")
    with pytest.raises(CheckpointError, match=r"and 1 more problems"):
        load_model(copy_fixture(tmp_path, t))


def test_orbax_checkpoint_with_wrong_shapes(tmp_path):
    other = ModelConfig("t", vocab_size=1000, n_positions=128, n_embd=32, n_layer=3, n_head=4, n_inner=64)
    out = save_orbax(random_params(other), other, tmp_path / "o")
    shutil.copy(FIXTURE / "config.json", out / "config.json")  # claims n_inner = 128
    with pytest.raises(CheckpointError, match=r"'h\.0\.mlp\.c_fc\.weight' has shape \(32, 64\) where config.json "
                                              r"implies \(32, 128\)"):  # fmt: skip
        load_model(out)


def test_directory_without_weights_says_what_it_looked_for(tmp_path):
    d = copy_fixture(tmp_path, drop_weights=True)
    with pytest.raises(CheckpointError, match=r"model\.safetensors, model\.safetensors\.index\.json, "
                                              r"flax_model\.msgpack, params/"):  # fmt: skip
        load_model(d)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="re-save it with safetensors"):
        load_model(d)


@pytest.mark.parametrize(
    "change, match",
    [({"activation_function": "relu"}, "activation_function"), ({"scale_attn_by_inverse_layer_idx": True}, "inverse"),
     ({"n_embd": 30}, "divisible"), ({"model_type": "mixtral"}, "model_type")],
)  # fmt: skip
def test_unsupported_configs(tmp_path, change, match):
    d = copy_fixture(tmp_path)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(raw | change))
    with pytest.raises(ValueError, match=match):
        load_model(d)


def test_bad_names_and_dtypes(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*gpt2-medium"):
        load_model("gpt5")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="dtype='float64' is not supported"):
        load_model(FIXTURE, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(FIXTURE)  # a real checkpoint gives no random-weights warning
