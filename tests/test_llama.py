"""The Llama family (llama, mistral, qwen2, qwen3) against transformers: rotary frequencies, logits, greedy
tokens, tokenizer and chat template, configs and checkpoints (fixtures: tests/llama_fixtures.py)."""

import json

import jax
import numpy as np
import pytest
from llama_fixtures import ENGINE, FIXTURES, NAMES, NEW, fixture, greedy

import jkv
from jkv.llama import rope_frequencies
from jkv.reference import reference_generate
from jkv.weights import CheckpointError, config_to_hf, load_hf_config
from kvspec.config import ModelConfig, freeze


# Rotary positions ------------------------------------------------------------------------------------------
def rope_cases():
    return [c for c in json.loads((FIXTURES / "rope.json").read_text()) if not c["name"].endswith("past_512")]


@pytest.mark.parametrize("case", rope_cases(), ids=lambda c: c["name"])
def test_rope_frequencies_equal_transformers(case):
    config = ModelConfig("rope", model_type="llama", n_embd=64, n_head=1, attention_head_dim=case["head_dim"],
                         n_positions=case["max_position_embeddings"], rope_theta=case["rope_theta"],
                         rope_scaling=freeze(case["rope_parameters"]))  # fmt: skip
    inv_freq, scaling = rope_frequencies(config)
    np.testing.assert_allclose(inv_freq, np.array(case["inv_freq"], np.float32), rtol=2e-7, atol=0)
    assert scaling == pytest.approx(case["attention_scaling"], rel=1e-12)


# Parity with transformers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_float32_logits_and_greedy_equal_transformers(name):
    model, expected, hf_logits = fixture(name)
    logits = model.logits(expected["ids"])
    assert np.abs(logits - hf_logits).max() < 1e-4
    assert np.abs(hf_logits).max() > 1.0  # a scale on which 1e-4 means something
    assert reference_generate(model, expected["prompts"], NEW) == expected["greedy"]
    assert reference_generate(model, expected["prompts"], NEW, use_cache=False) == expected["greedy"]


def test_mistral_window_is_what_transformers_masks():
    model, expected, hf_logits = fixture("mistral")
    assert model.config.sliding_window == 8 and len(expected["ids"]) > 3 * 8
    wide = jkv.Model(model.config.replace(sliding_window=None), model.params, "float32")
    assert np.abs(wide.logits(expected["ids"]) - hf_logits).max() > 0.1  # the window matters on these ids


def test_checkpoint_metadata_eos_tokenizer_and_chat_template():
    from jkv.serve.chat import load_chat_template
    from jkv.tokenizer import get_tokenizer

    model, expected, _ = fixture("llama")
    assert model.eos_token_ids == tuple(expected["eos_token_ids"]) == (380, 383)
    tok = get_tokenizer(FIXTURES / "llama")
    case = expected["tokenize"]
    assert tok.encode(case["text"]) == case["ids_add_special_tokens"]  # BOS from the post-processor
    assert tok.encode(case["text"], add_special_tokens=False) == case["ids_no_special_tokens"]
    assert tok.eos_token_id == expected["special_tokens"]["<|end_of_text|>"]
    chat = expected["chat"]
    text = load_chat_template(str(FIXTURES / "llama")).render(chat["messages"], chat["add_generation_prompt"])
    assert text == chat["text"]
    assert tok.encode(text, add_special_tokens=False) == chat["ids"]


def test_model_eos_ids_stop_requests_unless_ignored():
    model, expected, _ = fixture("llama")
    prompt = expected["prompts"][0]
    first = reference_generate(model, [prompt], 1)[0][0]
    stopper = jkv.Model(model.config, model.params, "float32", "", eos_token_ids=(first,))
    with jkv.Engine(stopper, **ENGINE) as eng:
        a = eng.add_request(prompt, jkv.SamplingParams(max_tokens=5))
        b = eng.add_request(prompt, greedy(5))
        out = eng.run()
    assert out[a].token_ids == [first] and out[a].finish_reason == "stop"
    assert len(out[b].token_ids) == 5


# Configs and checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_config_json(tmp_path, name):
    config = fixture(name)[0].config
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(config)))
    assert load_hf_config(tmp_path) == config


@pytest.mark.parametrize("change, match", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}, "longrope"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"]},
     "sliding-window and full"),
])  # fmt: skip
def test_configs_the_model_does_not_reproduce_are_refused(tmp_path, change, match):
    name = "qwen2" if "use_sliding_window" in change else "llama"
    raw = json.loads((FIXTURES / name / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | change))
    with pytest.raises(CheckpointError, match=match):
        load_hf_config(tmp_path)


def test_bad_tensors_are_named_with_both_shapes(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = FIXTURES / "llama"
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:64]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(64, 64\) "
                                              r"where config.json implies \(128, 64\)"):  # fmt: skip
        jkv.load_model(tmp_path)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = FIXTURES / "qwen2"
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    a, b = jkv.load_model(tmp_path, dtype="float32"), fixture("qwen2")[0]
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a.params, b.params))


def test_presets_load_random_weights_with_a_warning(monkeypatch):
    import jkv.weights

    draw = jkv.weights.random_params  # shapes only: drawing 494M numbers takes 14 s on two cores
    monkeypatch.setattr(jkv.weights, "random_params", lambda *a, **k: jax.eval_shape(lambda: draw(*a, **k)))
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = jkv.load_model("qwen2.5-0.5b", dtype="bfloat16")
    assert model.config.model_type == "qwen2" and model.dtype == np.dtype(jax.numpy.bfloat16)
    assert model.eos_token_ids == (151645,)
    assert model.params["layers_0"]["self_attn"]["q_proj"]["bias"].shape == (896,)
    with pytest.raises(CheckpointError, match="not served yet"):
        jkv.load_model("mixtral-8x7b")
