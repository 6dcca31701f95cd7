"""Engines in a long-lived process: device memory comes back when an engine is dropped or closed, repeated
`jkv.generate` calls reuse one engine and never grow device memory, a plan JAX's pool cannot hold is refused before
anything is allocated, and the public API's edges (prompts, aborts, the checkpoint's tokenizer) behave."""

import gc
from pathlib import Path

import jax
import numpy as np
import pytest

import jkv
import jkv.engine as engine_module
import jkv.pool_size as pool_size

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
SP = jkv.SamplingParams
OPTS = {"num_blocks": 40, "block_size": 4, "max_num_seqs": 4, "max_num_batched_tokens": 32}


@pytest.fixture(scope="module")
def model():
    return jkv.load_model(FIXTURE, dtype="float32")


@pytest.fixture
def no_gc():
    """Collection off: memory must come back by reference counting alone (no cycle may hold the pools)."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def prompts(model, seed=0, lengths=(3, 9, 17)):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, model.config.vocab_size, n).tolist() for n in lengths]


def test_dropping_an_engine_frees_its_pools_without_gc(model, no_gc):
    base = live_bytes()
    eng = jkv.Engine(model, **OPTS)
    pools = eng.executor.kv.pools.nbytes
    assert live_bytes() >= base + pools
    for p in prompts(model):
        eng.add_request(p, SP(max_tokens=5))
    eng.step()
    eng.step()  # a round is in flight (async scheduling) when the engine is dropped
    assert eng.executor.busy
    del eng
    assert live_bytes() <= base


def test_close_frees_now_and_a_closed_engine_says_so(model):
    base = live_bytes()
    with jkv.Engine(model, **OPTS) as eng:
        eng.add_request(prompts(model)[0], SP(max_tokens=3))
        eng.step()
        assert live_bytes() > base
    assert eng.closed and not eng.has_unfinished()
    assert live_bytes() <= base  # freed at close, while `eng` is still referenced
    for call in (lambda: eng.add_request([1, 2], SP(max_tokens=2)), eng.step, eng.warmup, eng.synchronize):
        with pytest.raises(RuntimeError, match="closed: create a new jkv.Engine"):
            call()
    eng.close()  # twice is harmless


def test_repeated_generate_reuses_one_engine_and_never_grows_memory(model, no_gc):
    ps = prompts(model, seed=1)
    first = jkv.generate(model, ps, SP(max_tokens=6), **OPTS)
    engine = engine_module.generate_engine()
    after_first = live_bytes()
    compiled = []
    for _ in range(4):
        again = jkv.generate(model, ps, SP(max_tokens=6), **OPTS)
        assert [o.token_ids for o in again] == [o.token_ids for o in first]
        assert engine_module.generate_engine() is engine  # same model, same options: the same engine
        assert live_bytes() <= after_first
        compiled.append(engine.stats().compilations)
    # the second call's prompts hit the prefix cache (shorter prefill shapes); from then on nothing compiles
    assert compiled[1:] == [compiled[0]] * 3
    # other options: the old engine is closed before the new one is built, so at most one is held
    jkv.generate(model, ps, SP(max_tokens=6), **(OPTS | {"num_blocks": 48}))
    assert engine.closed and engine_module.generate_engine() is not engine
    assert live_bytes() <= after_first + 48 * engine.bytes_per_block
    engine_module._release_last()


def test_llm_holds_one_engine(model):
    with jkv.LLM(model, **OPTS) as llm:
        a = llm.generate(prompts(model, seed=2), SP(max_tokens=4))
        b = llm.generate(prompts(model, seed=2), SP(max_tokens=4))
        assert [o.token_ids for o in a] == [o.token_ids for o in b] and all(len(o.token_ids) == 4 for o in a)
        eng = llm.engine
    assert eng.closed


def test_a_plan_larger_than_jax_pool_is_refused_before_allocating(model, monkeypatch):
    gib = 2**30
    monkeypatch.setattr(pool_size, "device_pool", lambda device=None: pool_size.DevicePool(int(17.9 * gib), gib))
    base = live_bytes()
    with pytest.raises(ValueError) as err:
        jkv.Engine(model, hbm="24GB", block_size=16)
    msg = str(err.value)
    assert "JAX's memory pool" in msg and "XLA_PYTHON_CLIENT_MEM_FRACTION=" in msg and "hbm=None" in msg
    assert msg.count("\n") == 0
    assert live_bytes() == base  # nothing was allocated
    # a plan that fits the pool builds; hbm=None plans against what the pool has free
    eng = jkv.Engine(model, hbm="1.2GB", block_size=16)
    assert eng.plan is not None and eng.plan.peak_bytes <= 1.2e9
    eng.close()
    # hbm=None plans against what JAX's pool has free (here 512 MiB), the resident weights counted back in
    monkeypatch.setattr(pool_size, "device_pool", lambda device=None: pool_size.DevicePool(2 * gib, 1536 * 2**20))
    eng = jkv.Engine(model, block_size=16)
    weights = sum(a.nbytes for a in jax.tree.leaves(model.params))
    assert eng.plan.budget_bytes <= 512 * 2**20 + weights and eng.plan.reserve_bytes == 0
    assert eng.executor.kv.pools.nbytes > 40 * 2**20
    eng.close()
    # a pool sized by hand is checked too
    with pytest.raises(ValueError, match="num_blocks=200000 needs .* XLA_PYTHON_CLIENT_MEM_FRACTION="):
        jkv.Engine(model, num_blocks=200_000, block_size=16)
    assert live_bytes() == base


def test_host_default_pool_is_capped_and_sized_to_the_work(model, monkeypatch):
    per_block = 16 * 2 * 3 * 32 * 4  # block_size x (K, V) x layers x embd x float32
    monkeypatch.setattr(pool_size, "HOST_DEFAULT_POOL_BYTES", 20 * per_block)
    eng = jkv.Engine(model, block_size=16, max_num_seqs=64)
    assert eng.manager.num_blocks == 20 and eng.bytes_per_block == per_block
    eng.close()
    eng = jkv.Engine(model, block_size=16, max_num_seqs=1)  # the work needs less: one full-length sequence
    assert eng.manager.num_blocks == 128 // 16 + 1
    eng.close()


def test_prompt_forms(model):
    tok = jkv.get_tokenizer(FIXTURE)
    ids = prompts(model, seed=3, lengths=(5,))[0]
    opts = OPTS | {"tokenizer": tok}
    one = jkv.generate(model, "hello there", SP(max_tokens=3), **opts)
    assert len(one) == 1  # a bare string is one prompt, not one per character
    assert one[0].token_ids == jkv.generate(model, [tok.encode("hello there")], SP(max_tokens=3), **opts)[0].token_ids
    flat = jkv.generate(model, ids, SP(max_tokens=3), **opts)
    assert len(flat) == 1 and flat[0].token_ids == jkv.generate(model, [ids], SP(max_tokens=3), **opts)[0].token_ids
    rows = jkv.generate(model, np.asarray([ids, ids[::-1]]), SP(max_tokens=3), **opts)
    assert len(rows) == 2 and rows[0].token_ids == flat[0].token_ids
    with pytest.raises(TypeError, match="float"):
        jkv.generate(model, [[1.0, 2.5]], SP(max_tokens=3), **opts)
    with pytest.raises(TypeError, match="float32"):
        jkv.generate(model, np.ones((2, 3), np.float32), SP(max_tokens=3), **opts)
    bad = jkv.generate(model, [ids, [model.config.vocab_size]], SP(max_tokens=3), **opts)
    assert bad[0].error is None and "outside the vocabulary" in bad[1].error  # bad input fails alone
    with pytest.raises(ValueError, match="outside the vocabulary"):  # the sampling of every prompt: refused once
        jkv.generate(model, [ids], SP(max_tokens=3, stop_token_ids=[model.config.vocab_size + 5]), **opts)
    engine_module._release_last()


def test_engine_uses_the_checkpoints_tokenizer(model):
    eng = jkv.Engine(model, **OPTS)  # the fixture's vocabulary is 1,000 tokens, with its own vocab.json
    assert eng.tokenizer is not None and eng.tokenizer.vocab_size == model.config.vocab_size
    rid = eng.add_request("the cat", SP(max_tokens=3))
    out = eng.run()[rid]
    assert out.text == eng.tokenizer.decode(out.token_ids)
    eng.close()


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_an_aborted_request_is_reported_finished(model, async_scheduling):
    eng = jkv.Engine(model, async_scheduling=async_scheduling, **OPTS)
    ps = prompts(model, seed=4)
    want = [o.token_ids for o in jkv.generate(model, ps, SP(max_tokens=8), **OPTS)]
    ids = [eng.add_request(p, SP(max_tokens=8)) for p in ps]
    streamed = {i: [] for i in ids}
    for _ in range(3):
        for out in eng.step():
            streamed[out.request_id] += out.new_token_ids
    assert eng.abort(ids[1]) is True
    assert eng.abort(ids[1]) is False and eng.abort("no-such-id") is False
    reported = {}
    for out in eng.stream():
        streamed[out.request_id] += out.new_token_ids
        if out.finished:
            reported[out.request_id] = out
    aborted = reported[ids[1]]
    assert aborted.finished and aborted.finish_reason == "aborted"
    assert aborted.token_ids == want[1][: len(aborted.token_ids)] and len(aborted.token_ids) < 8
    assert streamed[ids[1]] == aborted.token_ids
    assert [reported[i].token_ids for i in (ids[0], ids[2])] == [want[0], want[2]]
    assert eng.stats().blocks_used == 0 and not eng.scheduler.requests  # nothing kept once reported
    rid = eng.add_request(ps[0], SP(max_tokens=8))
    eng.abort(rid)  # aborted before it ran: run() still reports it
    assert eng.run()[rid].finish_reason == "aborted"
    eng.close()
    engine_module._release_last()


def test_second_engine_of_the_same_shape_compiles_nothing(model):
    ps = prompts(model, seed=5)

    def serve():
        with jkv.Engine(model, **OPTS) as eng:
            for p in ps:
                eng.add_request(p, SP(max_tokens=4))
            eng.run()
            return eng.stats().compilations

    serve()
    assert serve() == 0
