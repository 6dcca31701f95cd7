"""jkv.sampling: SamplingParams' host-side checks, and the sampler's blocked pass (sample_tokens): the same tokens as
sampling each row on its own, and no [B, V] copy of the logits when B is not a multiple of the block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkv.sampling import SamplingParams, _sample_rows, sample_tokens
from planner.memory import SAMPLER_ROWS


def _rows(b: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, vocab)) * 3, jnp.float32)
    temperature = jnp.asarray(np.where(rng.random(b) < 0.25, 0.0, rng.uniform(0.5, 1.5, b)), jnp.float32)
    top_k = jnp.asarray(np.where(rng.random(b) < 0.5, 0, rng.integers(1, vocab, b)), jnp.int32)
    top_p = jnp.asarray(np.where(rng.random(b) < 0.5, 1.0, rng.uniform(0.3, 0.99, b)), jnp.float32)
    seeds = jnp.asarray(rng.integers(0, 2**32, b, dtype=np.uint64).astype(np.uint32))
    counters = jnp.asarray(rng.integers(0, 500, b), jnp.int32)
    return logits, temperature, top_k, top_p, seeds, counters


@pytest.mark.parametrize("b", [SAMPLER_ROWS - 3, SAMPLER_ROWS, 2 * SAMPLER_ROWS, 3 * SAMPLER_ROWS + 5])
def test_blocks_match_rows_sampled_one_at_a_time(b):
    args = _rows(b, 97, seed=b)
    got = np.asarray(jax.jit(sample_tokens)(*args))
    one = jax.jit(_sample_rows)
    want = np.array([int(one(*(a[r : r + 1] for a in args))[0]) for r in range(b)])
    np.testing.assert_array_equal(got, want)
    greedy = np.asarray(args[1]) == 0
    np.testing.assert_array_equal(got[greedy], np.asarray(jnp.argmax(args[0], -1))[greedy])


def _step_temp(b: int, vocab: int) -> int:
    """Compiled scratch of a step-like function: logits made inside the jit, sampled, and returned (as the engine's
    step does)."""

    def step(h, w, *rest):
        logits = (h @ w).astype(jnp.float32)
        return sample_tokens(logits, *rest), logits

    rows = _rows(b, vocab)
    args = [jax.ShapeDtypeStruct((b, 16), jnp.float32), jax.ShapeDtypeStruct((16, vocab), jnp.float32)]
    args += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in rows[1:]]
    return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_no_padded_logits_copy():
    """One row past a multiple of the block costs no more scratch than the multiple (plus a block's worth): the
    padded version held a whole extra [B, V] float32 copy (CPU: 2.0 copies against 0.88)."""
    b, vocab = 8 * SAMPLER_ROWS, 4096
    copy = (b + 1) * vocab * 4
    assert _step_temp(b + 1, vocab) < _step_temp(b, vocab) + 0.1 * copy


@pytest.mark.parametrize("b", [SAMPLER_ROWS + 1, 3 * SAMPLER_ROWS - 7])
def test_same_tokens_as_the_padded_sampler_it_replaced(b):
    """scripts/bench_sampler.py (jkv.bench.sampler) times the two against each other after checking this."""
    from jkv.bench.sampler import padded_sample_tokens

    args = _rows(b, 211, seed=7 * b)
    np.testing.assert_array_equal(np.asarray(jax.jit(sample_tokens)(*args)),
                                  np.asarray(jax.jit(padded_sample_tokens)(*args)))  # fmt: skip


# --- SamplingParams ---


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    rng = np.random.default_rng(3)
    stops = rng.integers(1, 50, 3)
    sp = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(7),
                        top_p=np.float64(0.875), seed=np.uint32(4_000_000_000), stop_token_ids=stops,
                        n=np.int8(2), beam_width=np.int16(3), length_penalty=np.float32(0.25),
                        ignore_eos=np.bool_(True))  # fmt: skip
    want = SamplingParams(5, 0.5, 7, 0.875, 4_000_000_000, tuple(stops.tolist()), 2, 3, 0.25, True)
    assert sp == want and hash(sp) == hash(want)
    for name, kind in [("max_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float),
                       ("seed", int), ("n", int), ("beam_width", int), ("length_penalty", float),
                       ("ignore_eos", bool)]:  # fmt: skip
        assert type(getattr(sp, name)) is kind, name
    assert all(type(t) is int for t in sp.stop_token_ids)
    assert type(SamplingParams(temperature=1).temperature) is float  # Python ints are fine in float fields


def test_existing_uses_still_work():
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, n=4, seed=7)
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.n, sp.seed, sp.stop_token_ids) == (8, 1.0, 50, 4, 7, ())
    assert SamplingParams(max_tokens=10, stop_token_ids=[3, 9]).stop_token_ids == (3, 9)
    assert SamplingParams(max_tokens=6, beam_width=3, length_penalty=-0.5).length_penalty == -0.5
    assert SamplingParams().greedy and not SamplingParams(temperature=0.8, top_p=0.9).greedy


@pytest.mark.parametrize(
    "stops, want",
    [(5, (5,)), (np.int64(5), (5,)), ([], ()), ((7, 3, 7), (7, 3, 7)), (np.array([4, 2]), (4, 2)),
     (range(2, 5), (2, 3, 4)), ({11}, (11,)), ((t for t in [8, 1]), (8, 1))],
)  # fmt: skip
def test_stop_token_ids_one_id_or_any_iterable(stops, want):
    got = SamplingParams(stop_token_ids=stops).stop_token_ids
    assert got == want and all(type(t) is int for t in got)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_tokens": True}, r"max_tokens=True is a bool: pass an integer"),
     ({"max_tokens": 5.0}, r"max_tokens=5\.0 is a float: pass an integer"),
     ({"max_tokens": "5"}, r"is a str: pass an integer"),
     ({"n": np.True_}, r"n=.*is a bool"),
     ({"top_k": False}, r"top_k=False is a bool"),
     ({"beam_width": 2.0}, r"beam_width=2\.0 is a float"),
     ({"seed": True}, r"seed=True is a bool"),
     ({"seed": 1.5}, r"seed=1\.5 is a float"),
     ({"temperature": True}, r"temperature=True is a bool: pass a finite number >= 0"),
     ({"temperature": "0.7"}, r"temperature='0\.7' is a str"),
     ({"top_p": None}, r"top_p=None is a NoneType: pass a number in \(0, 1\]"),
     ({"length_penalty": "x"}, r"length_penalty='x' is a str: pass a finite number"),
     ({"length_penalty": [1.0]}, r"length_penalty=\[1\.0\] is a list"),
     ({"stop_token_ids": "50256"}, r"stop_token_ids='50256' is a str: pass a token id or a list of them"),
     ({"stop_token_ids": None}, r"stop_token_ids=None is a NoneType"),
     ({"stop_token_ids": 2.0}, r"stop_token_ids=2\.0 is a float"),
     ({"stop_token_ids": np.array(3)}, r"is not iterable"),
     ({"stop_token_ids": [1, 2.0]}, r"stop_token_ids holds 2\.0 \(float\): pass integer token ids"),
     ({"stop_token_ids": [True]}, r"holds True \(bool\)"),
     ({"stop_token_ids": [[1, 2]]}, r"holds \[1, 2\] \(list\)"),
     ({"ignore_eos": 1}, r"ignore_eos=1 is a int: pass True or False")],
)  # fmt: skip
def test_wrong_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_tokens": 0}, r"max_tokens=0 must be a positive integer"),
     ({"max_tokens": np.int64(-3)}, r"max_tokens=-3 must be a positive integer"),
     ({"n": 0}, r"n=0 must be a positive"),
     ({"top_k": -2}, r"top_k=-2 must be an integer >= 0"),
     ({"temperature": -1.0}, r"temperature=-1\.0 must be a finite number >= 0"),
     ({"top_p": 0.0}, r"top_p=0\.0 must be in \(0, 1\]"),
     ({"top_p": 1.5}, r"top_p=1\.5 must be in"),
     ({"n": 3, "beam_width": 2}, r"n=3 must not exceed beam_width=2"),
     ({"stop_token_ids": -1}, r"stop_token_ids holds -1: token ids are >= 0"),
     ({"stop_token_ids": [4, -7]}, r"holds -7")],
)  # fmt: skip
def test_values_out_of_range_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("name", ["temperature", "top_p", "length_penalty"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float32("nan"), np.float64("inf")])
def test_non_finite_floats_are_rejected(name, bad):
    with pytest.raises(ValueError, match=rf"^{name}=.* is not finite: pass a"):
        SamplingParams(**{name: bad})


def test_seed_must_fit_the_uint32_sampler_key():
    # The sampler's keys are uint32: seed 2**32 + 1 would draw exactly what seed 1 draws, so it is refused.
    assert SamplingParams(seed=0).seed == 0 and SamplingParams(seed=2**32 - 1).seed == 2**32 - 1
    assert SamplingParams(seed=np.uint64(2**32 - 1)).seed == 2**32 - 1
    for bad in (2**32, 2**32 + 1, np.uint64(2**40), -1, np.int64(-5)):
        with pytest.raises(ValueError, match=r"seed=-?\d+ must be in \[0, 2\*\*32\)"):
            SamplingParams(seed=bad)
    assert SamplingParams(seed=None).seed is None


def test_check_vocab_names_the_bad_stop_id():
    rng = np.random.default_rng(11)
    stops = rng.integers(1, 97, 4).tolist()
    SamplingParams(stop_token_ids=stops).check_vocab(97)  # all inside
    SamplingParams(stop_token_ids=[0, 96]).check_vocab(97)  # both edges inside
    SamplingParams().check_vocab(97)
    with pytest.raises(ValueError, match=r"stop_token_ids holds 97, outside the vocabulary \[0, 97\): pass ids below 97"):
        SamplingParams(stop_token_ids=[*stops, 97]).check_vocab(97)
    with pytest.raises(ValueError, match=r"holds 50256, outside the vocabulary \[0, 1000\)"):
        SamplingParams(stop_token_ids=50256).check_vocab(1000)
