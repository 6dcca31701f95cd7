"""jkv.model: the attention math on hand-computed cases, the parameter tree, forward's contract, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkv.model import Model, attend_no_cache, forward, layer_norm, masked_attention
from jkv.weights import hf_tensor_names
from jkv.weights import random_params
from kvspec.config import ModelConfig


def tiny_model(n_kv_head: int | None = None, dtype: str = "float32", seed: int = 0) -> Model:
    """A 2-layer random GPT-2 with weights 10x GPT-2's init, so attention and greedy tokens are not trivial."""
    config = ModelConfig(
        "tiny", vocab_size=97, n_positions=48, n_embd=32, n_layer=2, n_head=4, n_kv_head=n_kv_head
    )
    params = random_params(config, "float32", seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key in ("scale", "bias") else x * 10.0, params
    )
    return Model(config, jax.tree.map(lambda x: x.astype(dtype), params), dtype, "tiny")


class TestMaskedAttention:
    def test_uniform_scores_average_the_visible_values(self):
        # q = k = 0, so every visible key scores 0 and softmax is uniform over the visible ones:
        # query 0 sees v0 -> 1.0; query 1 sees v0, v1 -> (1 + 3) / 2 = 2.0; query 2 -> (1 + 3 + 8) / 3 = 4.0.
        q = jnp.zeros((1, 3, 1, 2))
        k = jnp.zeros((1, 3, 1, 2))
        v = jnp.array([1.0, 3.0, 8.0]).reshape(1, 3, 1, 1).repeat(2, axis=-1)
        out, cache = attend_no_cache(0, q, k, v, "untouched")
        assert cache == "untouched"
        np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 2.0, 4.0], rtol=1e-6)

    def test_scale_is_one_over_sqrt_head_dim(self):
        # D = 4, q = (1,1,1,1), k0 = 0, k1 = (1,1,1,1) * ln(3) / 2: score1 = 4 * ln(3) / 2 / sqrt(4) = ln(3),
        # so query 1 weighs v1 three times v0: (0 * 1 + 1 * 3) / 4 = 0.75.
        q = jnp.ones((1, 2, 1, 4))
        k = jnp.stack([jnp.zeros(4), jnp.full(4, np.log(3.0) / 2)]).reshape(1, 2, 1, 4)
        v = jnp.array([0.0, 1.0]).reshape(1, 2, 1, 1).repeat(4, axis=-1)
        out, _ = attend_no_cache(0, q, k, v, None)
        np.testing.assert_allclose(out[0, 1, 0, 0], 0.75, rtol=1e-6)

    @pytest.mark.parametrize("hkv", [1, 2, 4])
    def test_grouped_query_equals_repeated_kv_heads(self, hkv):
        kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(kq, (2, 5, 4, 8))
        k = jax.random.normal(kk, (2, 5, hkv, 8))
        v = jax.random.normal(kv, (2, 5, hkv, 8))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((5, 5), bool)), (2, 5, 5))
        rep = 4 // hkv  # query head h reads KV head h // rep
        want = masked_attention(q, jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2), mask)
        np.testing.assert_allclose(masked_attention(q, k, v, mask), want, atol=1e-6)


def test_layernorm_is_float32_for_bfloat16_input():
    x = jax.random.normal(jax.random.key(1), (3, 16)).astype(jnp.bfloat16) * 50 + 100
    y = layer_norm({"scale": jnp.ones(16, jnp.bfloat16), "bias": jnp.zeros(16, jnp.bfloat16)}, x, 1e-5)
    x32 = x.astype(jnp.float32)
    want = (x32 - x32.mean(-1, keepdims=True)) / jnp.sqrt(x32.var(-1, keepdims=True) + 1e-5)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), want, atol=2e-2)  # only the final rounding to bf16


@pytest.mark.parametrize("n_kv_head", [None, 1])
def test_param_tree_matches_hf_names(n_kv_head):
    model = tiny_model(n_kv_head)
    c = model.config
    leaves = {tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree.leaves_with_path(model.params)}
    assert leaves == {tuple(path): tuple(shape) for path, shape in hf_tensor_names(c).values()}
    assert set(model.params) == {"wte", "wpe", "h_0", "h_1", "ln_f"}
    assert model.params["h_0"]["attn"]["c_attn"]["kernel"].shape == (c.n_embd, c.qkv_dim)  # Conv1D [in, out]
    assert sum(x.size for x in jax.tree.leaves(model.params)) == c.param_count


def test_logits_index_and_padding():
    model = tiny_model(n_kv_head=2)
    p, c = model.params, model.config
    a, b = [3, 1, 4, 1, 5, 9, 2], [6, 5, 3]
    tokens = jnp.array([a, b + [0] * 4], jnp.int32)  # b right-padded
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    full, cache = forward(p, c, tokens, positions, None, attend_no_cache)
    assert full.shape == (2, 7, 97) and full.dtype == jnp.float32 and cache is None
    last, _ = forward(p, c, tokens, positions, None, attend_no_cache, logits_index=jnp.array([6, 2]))
    assert last.shape == (2, 97)
    np.testing.assert_allclose(last, full[jnp.arange(2), jnp.array([6, 2])], atol=1e-5)
    # Row b alone gives the same logits as row b padded inside the batch, and Model.logits agrees.
    np.testing.assert_allclose(model.logits(b), full[1, :3], atol=1e-5)
    np.testing.assert_allclose(model.logits(a), full[0], atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_runs_in_its_dtype_with_float32_logits(dtype):
    f32, low = tiny_model(dtype="float32"), tiny_model(dtype=dtype)
    assert low.params["h_0"]["mlp"]["c_fc"]["kernel"].dtype == jnp.dtype(dtype)
    ids = [5, 17, 2, 88, 40, 41]
    got = low.logits(ids)
    assert got.dtype == np.float32
    want = f32.logits(ids)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_forward_traces_once_under_jit():
    model = tiny_model()
    traces = []

    def attend(layer_index, q, k, v, cache):
        traces.append(layer_index)
        return attend_no_cache(layer_index, q, k, v, cache)

    step = jax.jit(forward, static_argnums=(1, 5))
    for ids in ([1, 2, 3], [4, 5, 6]):
        step(model.params, model.config, jnp.array([ids]), jnp.array([[0, 1, 2]]), None, attend)
    assert traces == [0, 1]  # one trace, layers in order, layer_index a Python int


@pytest.mark.parametrize(
    "ids, match",
    [([], "non-empty"), ([[1, 2]], "1-D"), ([1, 97], "outside"), ([-1], "outside"), ([1.5], "integer"),
     (list(range(49)), "positions")],
)  # fmt: skip
def test_logits_rejects_bad_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        tiny_model().logits(ids)


@pytest.mark.parametrize("dtype, want", [("float32", "HIGHEST"), ("bfloat16", None)])
def test_float32_matmuls_run_at_highest_precision(dtype, want):
    # GPUs would otherwise run float32 matmuls through TF32 (0.43 max logit error on gpt2, see docs/model.md).
    m = tiny_model(n_kv_head=2, dtype=dtype)
    tokens = jnp.zeros((1, 3), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: forward(p, m.config, tokens, tokens, None, attend_no_cache))(m.params)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    precisions = {str(e.params["precision"]) for e in dots}
    assert len(dots) == 2 * 6 + 1  # per layer: c_attn, scores, probs @ v, c_proj, c_fc, c_proj; then logits
    assert all(want in p for p in precisions) if want else precisions == {"None"}
