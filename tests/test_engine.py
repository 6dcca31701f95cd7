"""The paged engine against the dense reference generator: token-for-token equality under every engine feature."""

from pathlib import Path

import jax
import numpy as np
import pytest

import jkv
from jkv.compile_cache import close_store
from jkv.reference import reference_generate

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"

# A compiled step is shared by every engine with the same pool shape, token buffer and step shape (jkv/runner.py
# `_JITTED`); a different num_blocks or max_num_seqs compiles everything again. So the tests run on two engine
# configurations wherever the block sizes under test allow, and each is compiled once for the module:
# ROOMY: a pool nothing is preempted from, through `generate` (multi-step decode, greedy);
# TIGHT: a pool that preempts, one decode step per call (Engine's default), greedy and sampled.
ROOMY = {"num_blocks": 120, "block_size": 4, "max_num_seqs": 16, "max_num_batched_tokens": 64}
TIGHT = {"num_blocks": 32, "block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 64}


@pytest.fixture(scope="module")
def model():
    return jkv.load_model(FIXTURE, dtype="float32")


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(1)
    lengths = [1, 3, 7, 8, 9, 15, 16, 17, 30, 45]  # around the block sizes used below
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return reference_generate(model, prompts, max_tokens=10)


def run(model, prompts, sampling=None, **opts):
    """`jkv.generate` on the ROOMY engine (`opts` override it); greedy, 10 tokens unless `sampling` says."""
    return jkv.generate(model, prompts, sampling or jkv.SamplingParams(max_tokens=10), **(ROOMY | opts))


def run_tight(model, prompts, sampling):
    """`jkv.generate` on the TIGHT engine, one decode step per call (the steps the Engine tests compile)."""
    return jkv.generate(model, prompts, sampling, **TIGHT, decode_steps=1)


@pytest.mark.parametrize(
    "block_size,prefix,num_blocks",
    [(1, True, 400), (4, False, 120), (4, True, 120), (16, True, 40), (8, False, 30)],
)
def test_greedy_equals_dense_reference(model, prompts, expected, block_size, prefix, num_blocks):
    outs = run(model, prompts, block_size=block_size, enable_prefix_caching=prefix, num_blocks=num_blocks)
    for out, ref in zip(outs, expected):
        assert out.error is None
        assert out.token_ids == ref


def test_small_chunks_split_long_prompts(model, prompts, expected):
    # 16 tokens per step: the 45-token prompt is prefilled in chunks beside running decodes, and prompts are
    # admitted a few per step while earlier ones decode
    outs = run(model, prompts, max_num_batched_tokens=16)
    assert [o.token_ids for o in outs] == expected


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_gives_uninterrupted_tokens(model, prompts, expected, mode):
    eng = jkv.Engine(model, **TIGHT, preemption_mode=mode, swap_blocks=64 if mode == "swap" else 0)
    ids = [eng.add_request(p, jkv.SamplingParams(max_tokens=10)) for p in prompts]
    final = eng.run()
    stats = eng.stats()
    assert (stats.preemptions_swap if mode == "swap" else stats.preemptions_recompute) > 0
    if mode == "swap":
        assert stats.swap_bytes > 0 and stats.swap_bytes % eng.bytes_per_block == 0
    for rid, ref in zip(ids, expected):
        assert final[rid].token_ids == ref
    assert stats.blocks_used == 0  # every block came back


def test_prefix_sharing_hits_and_matches(model, expected):
    rng = np.random.default_rng(2)
    shared = rng.integers(0, model.config.vocab_size, 24).tolist()
    ps = [shared + rng.integers(0, model.config.vocab_size, n).tolist() for n in (1, 5, 9)]
    ref = reference_generate(model, ps, max_tokens=6)
    eng = jkv.Engine(model, **TIGHT)  # 24 shared tokens: 6 full blocks
    first = eng.add_request(ps[0], jkv.SamplingParams(max_tokens=6))
    done = eng.run()
    rest = [eng.add_request(p, jkv.SamplingParams(max_tokens=6)) for p in ps[1:]]
    done |= eng.run()
    assert [done[r].token_ids for r in [first, *rest]] == ref
    assert eng.stats().prefix_hit_rate > 0.5


def test_stats_tell_the_truth(model):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 1000, 10).tolist()
    b = rng.integers(0, 1000, 6).tolist()
    eng = jkv.Engine(model, **TIGHT)
    eng.add_request(a, jkv.SamplingParams(max_tokens=5))
    eng.add_request(b, jkv.SamplingParams(max_tokens=5))
    eng.step()  # both prompts prefilled; their sampled tokens have no slot yet
    s = eng.stats()
    # a: 10 tokens -> 3 blocks (12 slots), b: 6 tokens -> 2 blocks (8 slots): 5 blocks, 20 slots, 16 tokens
    assert (s.blocks_total, s.blocks_used, s.blocks_free) == (31, 5, 31 - 5)  # the null block is not counted
    assert s.internal_fragmentation == pytest.approx(4 / 20)
    # c shares a's first two full blocks (8 tokens) and adds 3: 11 tokens -> 3 blocks, 2 of them shared
    c = a[:8] + rng.integers(0, 1000, 3).tolist()
    eng.add_request(c, jkv.SamplingParams(max_tokens=5))
    eng.step()
    s = eng.stats()
    assert s.prefix_hit_rate == pytest.approx(8 / (10 + 6 + 11))
    assert s.blocks_saved_by_sharing == 2


def test_parallel_sampling_shares_prompt_blocks(model):
    prompt = list(range(5, 5 + 22))
    sp = jkv.SamplingParams(max_tokens=8, temperature=1.0, top_k=50, n=4, seed=7)
    eng = jkv.Engine(model, **TIGHT, record_history=True)
    rid = eng.add_request(prompt, sp)
    out = eng.run()[rid]
    assert len(out.samples) == 4 and all(len(x.token_ids) == 8 for x in out.samples)
    assert len({tuple(x.token_ids) for x in out.samples}) > 1  # different seeds, different samples
    assert max(h["blocks_saved_by_sharing"] for h in eng.history) >= 22 // 4  # the prompt's full blocks
    again = run_tight(model, [prompt], sp)[0]  # another engine
    assert [x.token_ids for x in again.samples] == [x.token_ids for x in out.samples]  # seeded: reproducible


def test_sampling_is_batch_independent(model, prompts):
    sp = jkv.SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=11)
    alone = run_tight(model, prompts[4:5], sp)[0].token_ids
    together = run_tight(model, prompts, sp)[4].token_ids  # in a batch of ten
    assert alone == together


def test_greedy_n_samples_equal_reference(model, prompts, expected):
    out = run(model, prompts[5:6], jkv.SamplingParams(max_tokens=10, n=3))[0]
    assert [x.token_ids for x in out.samples] == [expected[5]] * 3


def _beam_reference(model, prompt, width, max_tokens, stop=()):
    """Host beam search over full-recompute logits, the same rules as the engine's."""
    beams = [(0.0, [])]
    finished = []
    for step in range(max_tokens):
        cands = []
        for cum, toks in beams:
            logits = model.logits(prompt + toks)[-1].astype(np.float64)
            logp = logits - np.logaddexp.reduce(logits)
            for t in np.argsort(-logp)[: 2 * width]:
                cands.append((cum + logp[t], toks, int(t)))
        cands.sort(key=lambda c: -c[0])
        cands = cands[: 2 * width]
        new = []
        for score, toks, t in cands:
            if t in stop:
                finished.append((score / (step + 1), toks + [t]))
                continue
            new.append((score, toks + [t]))
            if len(new) == width:
                break
        if step + 1 >= max_tokens or len(finished) >= width:
            finished += [(s / (step + 1), t) for s, t in new]
            break
        beams = new
    return max(finished, key=lambda f: f[0])[1]


def test_beam_search_matches_host_reference(model, prompts, expected):
    one = run(model, prompts[3:4], jkv.SamplingParams(max_tokens=10, beam_width=1))
    assert one[0].token_ids == expected[3]
    sp = jkv.SamplingParams(max_tokens=6, beam_width=3)
    eng = jkv.Engine(model, **TIGHT, record_history=True)
    rid = eng.add_request(prompts[6], sp)
    out = eng.run()[rid]
    assert out.token_ids == _beam_reference(model, prompts[6], 3, 6)
    assert max(h["blocks_saved_by_sharing"] for h in eng.history) > 0
    assert eng.stats().blocks_used == 0


def test_stop_tokens(model, prompts, expected):
    stop = expected[8][3]
    out = run(model, prompts[8:9], jkv.SamplingParams(max_tokens=10, stop_token_ids=[stop]))[0]
    cut = expected[8].index(stop) + 1
    assert out.token_ids == expected[8][:cut] and out.finish_reason == "stop"


def test_bad_input_is_per_request(model, prompts, expected):
    # an empty prompt, 125 + 10 tokens beyond the 128 positions, an id outside the vocab, between two good ones
    outs = run(model, [prompts[0], [], [1] * 125, [5, 2000], prompts[1]])
    assert outs[0].token_ids == expected[0] and outs[4].token_ids == expected[1]
    assert "empty" in outs[1].error
    assert "exceeds" in outs[2].error
    assert "outside" in outs[3].error
    eng = jkv.Engine(model, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="never fit"):
        eng.add_request(list(range(40)), jkv.SamplingParams(max_tokens=10))
    for kwargs in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"n": 0}):
        with pytest.raises(ValueError):
            jkv.SamplingParams(**kwargs)
    assert eng.stats().blocks_used == 0 and not eng.has_unfinished()


def test_streaming_and_abort(model, prompts, expected):
    eng = jkv.Engine(model, **TIGHT)
    ids = [eng.add_request(p, jkv.SamplingParams(max_tokens=10)) for p in prompts[:4]]
    streamed = {i: [] for i in ids}
    final = {}
    aborted = False
    for out in eng.stream():
        assert out.request_id not in final, "a request reported after it finished"
        assert all(t >= 0 for t in out.token_ids), "a placeholder token leaked"
        streamed[out.request_id] += out.new_token_ids
        if out.finished:
            final[out.request_id] = out
        if not aborted and ids[1] not in final and len(streamed[ids[1]]) >= 2:
            assert eng.abort(ids[1])
            aborted = True
    assert aborted
    # the aborted request is reported once more, finished: what streamed is a prefix of its full output
    cut = final[ids[1]]
    assert cut.finished and cut.finish_reason == "aborted"
    assert streamed[ids[1]] == cut.token_ids == expected[1][: len(cut.token_ids)] and len(cut.token_ids) < 10
    for i, ref in zip(ids, expected[:4]):
        if i == ids[1]:
            continue
        assert streamed[i] == ref == final[i].token_ids
        assert final[i].finish_reason == "length"
    assert not eng.abort(ids[1]) and not eng.abort(ids[0])  # finished: nothing to abort
    assert not eng.abort("no-such-request")
    assert eng.stats().blocks_used == 0 and not eng.has_unfinished()


def test_compilations_are_bounded(model):
    rng = np.random.default_rng(4)
    eng = jkv.Engine(model, **(TIGHT | {"max_num_batched_tokens": 32}))
    for n in rng.integers(1, 60, 24):
        eng.add_request(rng.integers(0, 1000, int(n)).tolist(), jkv.SamplingParams(max_tokens=int(rng.integers(1, 12))))
    eng.run()
    runner = eng.executor.runner
    # step shapes are powers of two: rows <= 8 (4 buckets), chunk 16..32 (2), table width <= 32 blocks (6)
    assert len(runner.compiled) <= 4 * 6 + 4 * 2 * 6
    assert len({k[:2] for k in runner._fns}) <= 2  # decode/prefill, greedy
    # XLA compiles each step shape once (not at all where an earlier engine of this configuration did); the only
    # other program a greedy run without forks or swaps can compile is a copy-on-write, one per copy bucket
    assert eng.stats().compilations <= len(runner.compiled) + len(eng.shapes.copy_buckets())


def test_step_updates_pools_in_place(model):
    eng = jkv.Engine(model, **ROOMY)
    from jkv.runner import build_inputs

    x = build_inputs([([1], 0, [1], 0.0, 0, 1.0, 0, 0)], block_size=4, chunk=1, width=1, batch=1)
    kv = eng.executor.kv
    mem = eng.executor.runner.lower(kv.pools, x, decode=True).compile().memory_analysis()
    pool = kv.pools.nbytes
    assert mem.alias_size_in_bytes >= pool  # the donated pools are the outputs' buffers
    assert mem.temp_size_in_bytes < pool / 4  # no second pool is materialized
    before = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(kv.pools)]
    eng.add_request([1, 2, 3], jkv.SamplingParams(max_tokens=3))
    eng.run()
    after = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(kv.pools)]
    assert before == after


def test_compile_cache_dir_keeps_compiled_steps(model, tmp_path):
    cache = tmp_path / "compile-cache"
    try:
        jkv.generate(model, [[1, 2, 3]], jkv.SamplingParams(max_tokens=2), num_blocks=16, block_size=4,
                     max_num_seqs=2, compile_cache_dir=str(cache))  # fmt: skip
        assert any((cache / "executables").glob("*.jkvx"))  # jkv's steps, serialized
        assert jax.config.jax_compilation_cache_dir is None  # JAX's own cache is not layered under the store
    finally:
        close_store()


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_forks_fit_the_batch_and_come_back_together(model, async_scheduling):
    # n = 3 requests are admitted as one sequence and fork after their first token: admission counts their 3
    # seats, so a decode batch never exceeds max_num_seqs; preempted by recomputation, the 3 forks are
    # readmitted together (both used to crash: a batch wider than its bucket, an allocation the pool lacked)
    rng = np.random.default_rng(0)
    reqs = [(rng.integers(0, 1000, int(rng.integers(5, 30))).tolist(),
             jkv.SamplingParams(max_tokens=16, n=3 if i % 2 == 0 else 1, temperature=1.0, seed=i))
            for i in range(6)]  # fmt: skip
    eng = jkv.Engine(model, **TIGHT, async_scheduling=async_scheduling)
    ids = [eng.add_request(p, sp) for p, sp in reqs]
    final, widest = {}, 0
    for out in eng.stream():
        widest = max(widest, eng.last_decode_rows)
        if out.finished:
            final[out.request_id] = out
    assert widest <= TIGHT["max_num_seqs"] and eng.stats().preemptions_recompute > 0 and eng.stats().blocks_used == 0
    for rid, (p, sp) in zip(ids, reqs):  # seeded sampling: the same samples as each request alone
        alone = run_tight(model, [p], sp)[0]
        assert [s.token_ids for s in final[rid].samples] == [s.token_ids for s in alone.samples]
        assert len(final[rid].samples) == sp.n and all(len(s.token_ids) == 16 for s in alone.samples)


def test_forks_under_a_sliding_window_are_sized_without_the_dropped_prompt(model):
    # window 16, block 1: each fork ends up holding 17 blocks of its own (the shared prompt slid out of the
    # window), 2 forks need 35 > 29 usable blocks; counting the 12 prompt blocks as shared admitted it, and
    # swapping it in and out forever livelocked the engine
    eng = jkv.Engine(model, num_blocks=30, block_size=1, sliding_window=16, max_num_seqs=4)
    with pytest.raises(ValueError, match="never fit"):
        eng.add_request(list(range(12)), jkv.SamplingParams(max_tokens=18, n=2))
    eng.add_request(list(range(12)), jkv.SamplingParams(max_tokens=18))  # one sequence: 17 blocks fit
    assert len(eng.run()) == 1
