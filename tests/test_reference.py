"""jkv.reference: the dense cache's bookkeeping, cache vs full recompute, batching, seeded sampling, errors."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkv.model import Model, attend_no_cache, forward
from jkv.reference import dense_attend, init_dense_cache, reference_generate
from jkv.weights import load_model, random_params
from kvspec.config import ModelConfig

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
PROMPTS = [[11, 400, 7], [900, 3, 3, 52, 17, 999, 0, 40, 41], [5]]


def tiny_gqa_model(n_kv_head: int) -> Model:
    """A 2-layer random GPT-2 with grouped-query attention, weights 10x GPT-2's init (non-trivial greedy)."""
    config = ModelConfig(
        "tiny", vocab_size=97, n_positions=40, n_embd=32, n_layer=2, n_head=4, n_kv_head=n_kv_head
    )
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key in ("scale", "bias") else x * 10.0, random_params(config, seed=3)
    )
    return Model(config, params, "float32", "tiny")


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE)


def test_dense_attend_writes_at_lengths_and_leaves_them():
    # Row 0 holds 2 tokens, row 1 holds 0: a call with T = 2 writes row 0 at slots 2, 3 and row 1 at 0, 1.
    c = ModelConfig("t", vocab_size=5, n_positions=8, n_embd=4, n_layer=2, n_head=2, n_kv_head=1)
    cache = init_dense_cache(c, batch=2, max_len=6, dtype=jnp.float32)._replace(lengths=jnp.array([2, 0]))
    q = jnp.zeros((2, 2, 2, 2))
    k = jnp.arange(1.0, 5.0).reshape(2, 2, 1, 1) * jnp.ones((2, 2, 1, 2))  # row 0: 1, 2; row 1: 3, 4
    out, new = dense_attend(1, q, k, 10 * k, cache)
    np.testing.assert_array_equal(new.k[1][0, :, 0, 0], [0, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(new.k[1][1, :, 0, 0], [3, 4, 0, 0, 0, 0])
    np.testing.assert_array_equal(new.k[0], cache.k[0])  # other layers untouched
    np.testing.assert_array_equal(new.lengths, [2, 0])  # the caller advances lengths
    # q = 0, so attention is uniform over visible slots: row 0 query 0 sees slots 0..2 -> (0 + 0 + 10) / 3;
    # row 1 query 1 sees slots 0, 1 -> (30 + 40) / 2 = 35.
    np.testing.assert_allclose(out[0, 0, :, 0], 10 / 3, rtol=1e-6)
    np.testing.assert_allclose(out[1, 1, :, 0], 35.0, rtol=1e-6)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_decode_logits_equal_full_recompute(n_kv_head):
    m = tiny_gqa_model(n_kv_head)
    seq = jnp.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    full, _ = forward(m.params, m.config, seq, jnp.arange(8)[None], None, attend_no_cache)  # [1, 8, V]
    cache = init_dense_cache(m.config, 1, 8, jnp.float32)
    step = jax.jit(forward, static_argnums=(1, 5))
    logits, cache = step(
        m.params, m.config, seq[:, :5], jnp.arange(5)[None], cache, dense_attend
    )  # prefill 5
    np.testing.assert_allclose(logits[0], full[0, :5], atol=1e-4)
    for t in range(5, 8):  # then one token at a time
        cache = cache._replace(lengths=jnp.array([t]))
        logits, cache = step(m.params, m.config, seq[:, t : t + 1], jnp.array([[t]]), cache, dense_attend)
        np.testing.assert_allclose(logits[0, 0], full[0, t], atol=1e-4)


def test_with_cache_and_full_recompute_give_the_same_greedy_tokens(model):
    cached = reference_generate(model, PROMPTS, 20)
    assert cached == reference_generate(model, PROMPTS, 20, use_cache=False)
    assert [len(c) for c in cached] == [20, 20, 20] and len({tuple(c) for c in cached}) == 3


def test_gqa_model_with_cache_and_full_recompute_agree():
    m = tiny_gqa_model(1)
    prompts = [[1, 2, 3], [50, 60, 70, 80, 90, 4]]
    cached = reference_generate(m, prompts, 12)
    assert cached == reference_generate(m, prompts, 12, use_cache=False)
    assert len(set(cached[0])) > 1  # not a degenerate repeat


def test_batched_ragged_equals_one_prompt_at_a_time(model):
    batched = reference_generate(model, PROMPTS, 10)
    assert batched == [reference_generate(model, [p], 10)[0] for p in PROMPTS]


def test_temperature_sampling_is_seeded(model):
    a = reference_generate(model, PROMPTS, 12, temperature=1.0, seed=7)
    assert a == reference_generate(model, PROMPTS, 12, temperature=1.0, seed=7)
    assert a == reference_generate(model, PROMPTS, 12, temperature=1.0, seed=7, use_cache=False)
    assert a != reference_generate(model, PROMPTS, 12, temperature=1.0, seed=8)
    assert a != reference_generate(model, PROMPTS, 12)  # differs from greedy


def test_low_temperature_approaches_greedy(model):
    assert reference_generate(model, PROMPTS, 8, temperature=1e-4) == reference_generate(model, PROMPTS, 8)


def test_bfloat16_cache_and_recompute_agree_on_early_tokens():
    m = load_model(FIXTURE, dtype="bfloat16")
    assert m.dtype == jnp.bfloat16
    cached = reference_generate(m, PROMPTS[:2], 4)
    assert cached == reference_generate(m, PROMPTS[:2], 4, use_cache=False)


def test_eos_stops_a_row_and_edge_lengths(model):
    greedy = reference_generate(model, PROMPTS, 10)
    eos = greedy[1][3]
    stopped = reference_generate(model, PROMPTS, 10, eos_token_id=eos)
    assert stopped[1] == greedy[1][: greedy[1].index(eos) + 1]
    for row, full in zip(stopped, greedy):
        assert row == (full[: full.index(eos) + 1] if eos in full else full)
    assert reference_generate(model, PROMPTS, 0) == [[], [], []]
    assert reference_generate(model, [], 5) == []
    assert reference_generate(model, [PROMPTS[0]], 1) == [greedy[0][:1]]
    assert len(reference_generate(model, [[1] * 100], 28)[0]) == 28  # exactly fills n_positions = 128


@pytest.mark.parametrize(
    "kwargs, match",
    [({"prompt_ids": [[1] * 100], "max_tokens": 29}, "exceeds the model's 128 positions"),
     ({"prompt_ids": [[1], []], "max_tokens": 3}, "prompt 1 is empty"),
     ({"prompt_ids": [[1, 1000]], "max_tokens": 3}, "outside"),
     ({"prompt_ids": [[1]], "max_tokens": -1}, "max_tokens"),
     ({"prompt_ids": [[1]], "max_tokens": 2, "temperature": -0.5}, "temperature")],
)  # fmt: skip
def test_bad_requests(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference_generate(model, **kwargs)


def test_logits_of_generated_sequence_are_consistent(model):
    # The greedy token is the argmax of a full forward over prompt + generated prefix, at every step.
    prompt = PROMPTS[1]
    gen = reference_generate(model, [prompt], 6)[0]
    logits = model.logits(prompt + gen[:-1])
    assert list(np.argmax(logits[len(prompt) - 1 :], axis=-1)) == gen


def test_prompts_follow_the_shared_rule(model):
    # jkv.prompts.as_prompt_list / as_token_ids: a flat list is one prompt, a 2-D int array one prompt per row,
    # numpy ids are fine; floats and strings are rejected rather than truncated or iterated.
    want = reference_generate(model, PROMPTS[:1], 4)
    assert reference_generate(model, PROMPTS[0], 4) == want
    assert reference_generate(model, np.array(PROMPTS[0], np.int64), 4) == want
    rows = np.random.default_rng(5).integers(1, 1000, (2, 6))
    assert reference_generate(model, rows, 3) == reference_generate(model, rows.tolist(), 3)
    with pytest.raises(TypeError, match="dtype float32"):
        reference_generate(model, rows.astype(np.float32), 3)
    with pytest.raises(TypeError, match=r"holds 1\.5 \(float\)"):
        reference_generate(model, [[1, 1.5]], 3)
    with pytest.raises(TypeError, match="prompt 0 is a string"):
        reference_generate(model, "Hello", 3)
