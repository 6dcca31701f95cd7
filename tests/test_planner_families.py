"""The planner on every supported family, against transformers' own models (fixtures from
scripts/make_config_fixtures.py) and against KV sizes worked out by hand."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvspec.config import ConfigError, family_presets, load_config
from kvspec.hf_config import SUPPORTED_MODEL_TYPES, config_from_hf
from kvspec.layout import kv_bytes_per_token, kv_dtype, sequence_layer_blocks
from kvspec.params import param_shapes
from planner import PlanOptions, make_plan, param_bytes, plan_to_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf_configs"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
GB = 10**9
BF16 = kv_dtype("bfloat16")


def _hf_gpt2_names(shapes: dict) -> dict:
    """transformers' GPT2LMHeadModel names -> jkv's GPT-2 checkpoint names (no `transformer.` prefix)."""
    rename = {"wte.weight": "wte", "wpe.weight": "wpe", "lm_head.weight": "lm_head"}
    out = {}
    for name, shape in shapes.items():
        name = name.removeprefix("transformer.")
        out[rename.get(name, name)] = shape
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED["tiny"]))
def test_tiny_family_equals_transformers_tensor_by_tensor(name):
    config = config_from_hf(FIXTURES / f"{name}.json")
    want = EXPECTED["tiny"][name]
    theirs = want["shapes"] if config.model_type != "gpt2" else _hf_gpt2_names(want["shapes"])
    mine = {k: list(v) for k, v in config.param_shapes().items()}
    assert mine == theirs
    assert config.param_count == want["param_count"]
    assert list(config.layer_windows) == want["layer_windows"]


def test_fixtures_cover_every_supported_family():
    types = {json.loads((FIXTURES / f"{n}.json").read_text())["model_type"] for n in EXPECTED["tiny"]}
    assert set(SUPPORTED_MODEL_TYPES) <= types | {"gemma3_text"}
    assert set(SUPPORTED_MODEL_TYPES) - types == set()


@pytest.mark.parametrize("name", sorted(EXPECTED["presets"]))
def test_preset_planned_exactly(name):
    config = load_config(name)
    want = EXPECTED["presets"][name]
    assert config.preset
    assert config.param_count == want["param_count"]
    assert list(config.layer_windows) == want["layer_windows"]
    plan = make_plan(config, PlanOptions(hbm_bytes=2000 * GB, max_seq_len=min(config.n_positions, 8192)))
    d = plan_to_dict(plan)
    assert d["param_count"] == want["param_count"] and d["preset"] is True
    assert d["param_bytes"] == want["param_count"] * (4 if d["dtype"] == "float32" else 2)


def test_every_packaged_preset_has_a_transformers_count():
    assert sorted(family_presets()) == sorted(EXPECTED["presets"])


@pytest.mark.parametrize(
    "name, per_token",
    [
        ("llama-3.1-8b", 2 * 32 * 8 * 128 * 2),  # 131,072
        ("qwen2.5-7b", 2 * 28 * 4 * 128 * 2),  # 57,344
        ("mistral-7b", 2 * 32 * 8 * 128 * 2),  # 131,072
        ("phi-3-mini", 2 * 32 * 32 * 96 * 2),  # 393,216
        ("deepseek-v2-lite", 27 * 576 * 2),  # 31,104: one latent of 512 + 64 per layer
        ("gemma-2-9b", 2 * 42 * 8 * 256 * 2),  # inside every window
        ("mixtral-8x7b", 2 * 32 * 8 * 128 * 2),  # KV as the dense model
    ],
)
def test_kv_bytes_per_token_by_hand(name, per_token):
    assert kv_bytes_per_token(load_config(name), BF16) == per_token


def test_quantized_kv_counts_scales_for_every_cache_kind():
    llama, lite = load_config("llama-3.1-8b"), load_config("deepseek-v2-lite")
    assert kv_bytes_per_token(llama, kv_dtype("int8")) == 2 * 32 * 8 * (128 + 2)
    assert kv_bytes_per_token(llama, kv_dtype("int4")) == 2 * 32 * 8 * (64 + 4 * 2)
    assert kv_bytes_per_token(lite, kv_dtype("int8")) == 27 * (576 + 2)
    assert kv_bytes_per_token(lite, kv_dtype("int4")) == 27 * (288 + 18 * 2)
    d = plan_to_dict(make_plan(lite, PlanOptions(hbm_bytes=80 * GB, max_seq_len=4096)))
    assert d["kv_cache"]["kind"] == "mla_latent" and d["pool_shape"][2:] == [1, 16, 576]
    full = 27 * 16 * ((128 + 64) + 128) * 2  # K heads and V heads the latent replaces
    assert d["mla"]["full_kv_bytes_per_token"] == full
    assert d["mla"]["times_smaller"] == pytest.approx(full / 31_104)


def test_gemma2_sliding_layers_stop_at_the_window():
    gemma = load_config("gemma-2-9b")
    assert gemma.hybrid_attention and gemma.layer_windows[:3] == (4096, None, 4096)
    plan = make_plan(gemma, PlanOptions(hbm_bytes=80 * GB, dtype="bfloat16"))
    bs, per_layer = 16, 2 * 8 * 256 * 2
    for n in (100, 4096, 4100, 8192):
        full_blocks = math.ceil(n / bs)
        sliding_blocks = min(full_blocks, math.ceil(4096 / bs) + 1)
        assert sequence_layer_blocks(gemma, n, bs) == 21 * full_blocks + 21 * sliding_blocks
        assert plan.max_batch(n) == min(plan.max_num_seqs, plan.layout.usable_blocks * 42 // (21 * full_blocks + 21 * sliding_blocks))
    # beyond the window a sequence costs less than the same model without one
    dense = make_plan(gemma.replace(layer_types=None, sliding_window=None), PlanOptions(hbm_bytes=80 * GB, dtype="bfloat16"))
    assert plan.max_batch(8192) > dense.max_batch(8192)
    assert plan.layout.num_blocks == dense.layout.num_blocks
    assert plan.max_batch(4000) == dense.max_batch(4000)  # inside the window both hold every token
    # static reservations: a sliding layer reserves its window, a full one the whole context
    reach = 21 * 8192 + 21 * 4096
    assert plan.static_max_batch() == min(plan.max_num_seqs, plan.kv_pool_bytes // (reach * per_layer))
    # the longest context per batch: fits, and one token more does not
    for x in plan.by_batch:
        if 0 < x.paged < plan.max_seq_len:
            cost = lambda n: x.batch * sequence_layer_blocks(gemma, n, bs)  # noqa: E731
            assert cost(x.paged) <= plan.layer_blocks < cost(x.paged + 1)
    d = plan_to_dict(plan)
    kinds = d["kv_bytes_per_token_by_layer_kind"]
    assert kinds["sliding_attention"]["layers"] == list(range(0, 42, 2))
    assert kinds["sliding_attention"]["bytes_per_token"] + kinds["full_attention"]["bytes_per_token"] == 344_064


def test_tp_splits_every_tensor_once_and_kv_heads_until_replicated():
    for name in ("llama-3.1-8b", "mixtral-8x7b", "deepseek-v2-lite", "qwen2.5-7b", "gemma-3-12b"):
        config = load_config(name)
        full, half = param_shapes(config, 1), param_shapes(config, 2)
        assert full.keys() == half.keys()
        for key, shape in full.items():
            parts = half[key]
            split = [i for i, (a, b) in enumerate(zip(shape, parts, strict=True)) if a != b]
            assert len(split) <= 1, key  # replicated, or split along one axis
            if split:
                assert parts[split[0]] == -(-shape[split[0]] // 2), key
    llama = load_config("llama-3.1-8b")
    e, f, v = 4096, 14336, 128256
    layer = (e * e + 2 * 1024 * e + e * e) // 2 + 3 * f * e // 2 + 2 * e  # q, k, v, o and the MLP split; norms whole
    assert param_bytes(llama, 1, 2) == 2 * (v // 2) * e + 32 * layer + e
    bytes_at = {tp: kv_bytes_per_token(llama, BF16, tp) for tp in (1, 2, 4, 8, 16)}
    assert [bytes_at[1] // bytes_at[tp] for tp in (2, 4, 8, 16)] == [2, 4, 8, 8]  # 8 KV heads: replicated at 16
    assert param_shapes(llama, 16)["model.layers.0.self_attn.k_proj.weight"] == (128, e)
    lite = load_config("deepseek-v2-lite")
    assert kv_bytes_per_token(lite, BF16, 2) == kv_bytes_per_token(lite, BF16, 1)  # the latent is replicated
    mixtral = param_shapes(load_config("mixtral-8x7b"), 2)
    assert mixtral["model.layers.0.mlp.experts.gate_up_proj"] == (8, 14336, 4096)  # every expert split
    assert mixtral["model.layers.0.mlp.gate.weight"] == (8, 4096)  # the router whole


def test_weight_dtype_defaults_to_the_config():
    assert make_plan(load_config("gemma-2-9b"), PlanOptions(hbm_bytes=80 * GB)).options.dtype == "float32"
    assert make_plan(load_config("llama-3.1-8b"), PlanOptions(hbm_bytes=80 * GB)).options.dtype == "bfloat16"
    assert make_plan(load_config("gemma-2-9b"), PlanOptions(hbm_bytes=80 * GB, dtype="bfloat16")).param_bytes == (
        2 * 9_241_705_984
    )


def _write(tmp_path: Path, raw: dict | str) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return d


def test_both_config_spellings_read_alike(tmp_path):
    v5 = json.loads((FIXTURES / "llama.json").read_text())  # rope_parameters, dtype
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
    v4 |= {"rope_theta": 500000.0, "rope_scaling": {k: v for k, v in v5["rope_parameters"].items() if k != "rope_theta"},
           "torch_dtype": "bfloat16"}  # fmt: skip
    a, b = config_from_hf(FIXTURES / "llama.json"), config_from_hf(_write(tmp_path, v4))
    assert a.rope_theta == b.rope_theta == 500000.0
    assert dict(b.rope_scaling)["rope_type"] == dict(a.rope_scaling)["rope_type"] == "llama3"
    assert a.param_shapes() == b.param_shapes() and b.weight_dtype == "bfloat16"


LLAMA = json.loads((FIXTURES / "llama.json").read_text())


@pytest.mark.parametrize(
    "raw, needle",
    [
        ("{not json", "is not valid JSON"),
        ({}, "has no model_type: add it"),
        ({k: v for k, v in LLAMA.items() if k != "model_type"}, "has no model_type"),
        ({"model_type": "mamba", "hidden_size": 8}, "model_type='mamba' is not supported; jkv plans gpt2"),
        ({k: v for k, v in LLAMA.items() if k != "num_hidden_layers"}, "has no num_hidden_layers: add it"),
        (LLAMA | {"hidden_size": 30, "head_dim": None}, "hidden_size=30 is not divisible by num_attention_heads=4"),
        (LLAMA | {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        (LLAMA | {"vocab_size": "big"}, "vocab_size='big' must be an integer"),
        (LLAMA | {"tie_word_embeddings": "yes"}, "must be true or false"),
    ],
)
def test_bad_configs_are_one_sentence(tmp_path, raw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
        config_from_hf(_write(tmp_path, raw))
    assert "\n" not in str(err.value)


def test_unknown_type_names_the_keys_that_make_it_plannable(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_hf(_write(tmp_path, {"model_type": "mamba"}))
    for word in ("llama", "deepseek_v3", "num_key_value_heads", "intermediate_size", "n_embd"):
        assert word in str(err.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}  # table cells on one line
    return subprocess.run([sys.executable, "-m", "jkv.cli", "plan", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)  # fmt: skip


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--hbm", "24GB", "--model", "llama-3.1-8b", "--tp", "3"], "--tp 3 must divide the model's 32 attention heads"),
        (["--hbm", "24GB", "--model", "mixtral-8x7b"], "all 8 experts of every MoE layer are resident"),
        (["--hbm", "24GB", "--seq-lens", "5000"], "sequence length 5000 in seq_lens (--seq-lens) is outside 1..1024"),
        (["--hbm", "1e30"], "larger than any device's memory"),
        (["--hbm", "24GB", "--sliding-window", "5000"], "--sliding-window 5000 must be between 1 and the model's 1024"),
        (["--hbm", "24GB", "--block-size", "4096"], "longer than the longest sequence"),
        (["--hbm", "24GB", "--max-num-seqs", "100000"], "lower max_num_seqs (--max-num-seqs) 100000"),
        (["--hbm", "24GB", "--model", "falcon-180b"], "unknown model 'falcon-180b': use a preset"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_cli_reports_a_llama_plan_in_words():
    r = _cli("--hbm", "24GB", "--model", "llama-3.1-8b")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "2 (K and V) x 32 layers x 8 KV heads x 128 x 2 B = 131,072 B per token" in out
    assert "is a preset: the shapes of its public config.json, no weights" in out
    assert "8,030,261,248 params (untied lm-head) x bfloat16" in out
    assert "for llama they were checked on an H200 at llama-3.1-8b's shapes" in out
    gemma = " ".join(_cli("--hbm", "80GB", "--model", "gemma-2-9b").stdout.split())
    assert "calibrated on GPT-2 only; gemma2 uses the same terms" in gemma
    assert "21 sliding layers (window 4,096; layers 0, 2, 4" in gemma and "21 full-attention layers (1, 3, 5" in gemma
    lite = " ".join(_cli("--hbm", "80GB", "--model", "deepseek-v2-lite").stdout.split())
    assert "would be 8.9x larger" in lite


def test_cli_tp_and_seq_lens_rows_say_what_they_are():
    r = _cli("--hbm", "24GB", "--tp", "2", "--seq-lens", "100,700,1000", "--json")
    d = json.loads(r.stdout)
    assert list(d["max_batch_by_seq_len"]) == ["100", "700", "1000"]
    assert d["fragmentation_by_seq_len"]["100"] == pytest.approx((112 - 100) / 112)
    assert d["seq_lens_fragmentation"] == pytest.approx((112 + 704 + 1008 - 1800) / (112 + 704 + 1008))
    text = " ".join(_cli("--hbm", "24GB", "--tp", "2").stdout.split())
    assert "this device's share of 124,439,808 params (tied embedding once) x bfloat16, split tp=2 ways" in text
    assert "split by vocabulary" in text


def test_console_script_and_typed_packages_ship():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("jkv") == "jkv.cli:main"
    for package in ("jkv", "kvspec", "planner"):
        assert (ROOT / package / "py.typed").is_file()
    r = subprocess.run([sys.executable, "-m", "jkv.cli", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown command 'nope'" in r.stderr


@pytest.mark.parametrize(
    "raw, needle",
    [("{not json", "is not valid JSON"), ({k: v for k, v in LLAMA.items() if k != "vocab_size"}, "has no vocab_size"),
     (LLAMA | {"num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": None},
      "hidden_size=32 is not divisible by num_attention_heads=5")],
)  # fmt: skip
def test_cli_bad_config_dir_is_one_line_exit_2(tmp_path, raw, needle):
    r = _cli("--hbm", "24GB", "--model", str(_write(tmp_path, raw)))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
