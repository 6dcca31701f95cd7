"""`Engine.warmup()`: after it, serving compiles nothing, and the warm-up itself leaves the KV pools untouched.

The workloads stagger arrivals and mix prompt and output lengths so the engine meets many batch shapes; any
shape `step_shapes()` misses would be compiled during the run and fail the tests. The tokens are checked
against the dense reference generator, so a warm-up that corrupted a pool or the token buffer would fail too.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

import jkv
from jkv.kv_cache import copy_blocks
from jkv.reference import reference_generate

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
# A compiled step is shared by every engine with the same pool shape, token buffer and step shape (jkv/runner.py
# `_JITTED`), so the tests share one configuration and each step shape compiles once for the module. Its 18
# blocks are fewer than 4 sequences of 64 tokens need: serving preempts (and, in swap mode, swaps).
SMALL = {"block_size": 8, "max_num_seqs": 4, "max_num_batched_tokens": 32, "max_seq_len": 64, "num_blocks": 18,
         "attention": "reference"}  # fmt: skip
# Fewer shapes, for the tests that need every step shape new to the process (each with a pool size of its own).
TINY = SMALL | {"max_num_seqs": 2, "max_num_batched_tokens": 16, "max_seq_len": 32}


@pytest.fixture(scope="module")
def model():
    return jkv.load_model(FIXTURE, dtype="float32")


def mixed_requests(model, n: int, seed: int) -> list[tuple[list[int], int]]:
    """n + 1 (prompt, max_tokens) pairs of mixed lengths that fit the SMALL engine's 64-token context."""
    rng = np.random.default_rng(seed)
    reqs = [(rng.integers(0, model.config.vocab_size, 2).tolist(), 5)]  # alone in one block: the narrowest steps
    for _ in range(n):
        p = int(rng.integers(1, 45))
        reqs.append((rng.integers(0, model.config.vocab_size, p).tolist(), int(rng.integers(1, 64 - p + 1))))
    return reqs


def serve(eng, reqs, arrive_every: int = 2) -> dict[str, list[int]]:
    """Add request i at step i * arrive_every (staggered: batches of every size); the greedy tokens per request."""
    final, steps = {}, 0
    while len(final) < len(reqs):
        if steps % arrive_every == 0 and steps // arrive_every < len(reqs):
            prompt, out = reqs[steps // arrive_every]
            eng.add_request(prompt, jkv.SamplingParams(max_tokens=out), request_id=f"r{steps // arrive_every}")
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o.token_ids
        steps += 1
        assert steps < 5000
    return final


def reference(model, reqs) -> dict[str, list[int]]:
    """The dense reference's greedy tokens per request, in one batch (one compilation for all of them): each
    request's first max_tokens of the longest output."""
    out = reference_generate(model, [p for p, _ in reqs], max_tokens=max(n for _, n in reqs))
    return {f"r{i}": tokens[:n] for i, (tokens, (_, n)) in enumerate(zip(out, reqs))}


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_after_warmup_serving_compiles_nothing(model, decode_steps):
    eng = jkv.Engine(model, decode_steps=decode_steps, **SMALL)
    report = eng.warmup(greedy=True)
    assert report["shapes"] == len(eng.step_shapes(greedy=True)) == len(eng.executor.runner.compiled)
    compiled, compilations = set(eng.executor.runner.compiled), eng.stats().compilations
    reqs = mixed_requests(model, 14, seed=1)
    got = serve(eng, reqs)
    new = eng.executor.runner.compiled - compiled
    assert not new, f"new step shapes while serving: {new}"
    assert eng.stats().compilations == compilations  # and no XLA compilation of any other program either
    assert got == reference(model, reqs)
    assert eng.warmup(greedy=True)["shapes"] == 0  # everything is compiled already


def backend_compiles():
    """A list that counts XLA compilations (one entry each) until `stop` is called on it."""
    events: list[float] = []

    def listener(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_compiles_are_the_ones_that_run(model, threads):
    # a pool size no other test uses: every step shape is new to the process (the pools are an argument)
    eng = jkv.Engine(model, decode_steps=3, **(TINY | {"num_blocks": 30 + threads}))
    events, stop = backend_compiles()
    try:
        report = eng.warmup(greedy=True, threads=threads)
    finally:
        stop()
    shapes = len(eng.step_shapes(greedy=True))
    assert report["shapes"] == shapes and report["parallel_failures"] == 0
    # the report's parts: the threads' share (none with one thread) and the runs', within its wall time
    assert (report["prepare_seconds"] > 0) == (threads > 1) and report["run_seconds"] > 0
    assert report["prepare_seconds"] + report["run_seconds"] <= report["seconds"]
    # one XLA compilation per step shape, whether the threads compiled it or the run: the runs reused them
    # (plus a few small helper programs: the copy-on-write buckets, filling the token buffer)
    assert shapes <= len(events) <= shapes + 8
    reqs = [(p[:12], min(n, 12)) for p, n in mixed_requests(model, 6, seed=threads)]  # TINY's 32 tokens
    assert serve(eng, reqs) == reference(model, reqs)


def test_warmup_rejects_bad_threads(model):
    eng = jkv.Engine(model, **SMALL)
    with pytest.raises(ValueError, match="positive integer"):
        eng.warmup(threads=0)


def test_every_shape_the_engine_meets_is_listed(model):
    # without a warm-up: what serving compiles is a subset of step_shapes() (the listing is not just "enough")
    eng = jkv.Engine(model, decode_steps=4, **SMALL)
    serve(eng, mixed_requests(model, 14, seed=7), arrive_every=3)
    listed = {(kind, g, shape) for kind, g, shape in eng.step_shapes(greedy=True)}
    met = set()
    for key in eng.executor.runner.compiled:
        if key[1] == "steps":  # (backend, "steps", greedy, shape, num_steps)
            met.add(("steps", key[2], key[3]))
        else:  # (backend, decode, greedy, shape)
            met.add(("decode" if key[1] else "prefill", key[2], key[3]))
    assert met and met <= listed
    assert {k for k, _, _ in met} == {"decode", "steps", "prefill"}


def test_warmup_leaves_the_pools_untouched(model):
    eng = jkv.Engine(model, **SMALL)
    reqs = mixed_requests(model, 3, seed=3)
    serve(eng, reqs, arrive_every=1)
    assert eng.stats().blocks_cached > 0  # prefix-cache content a later request could reuse
    before = [np.asarray(a)[1:].copy() for a in jax.tree.leaves(eng.executor.kv.pools)]  # block 0 is the null block
    eng.warmup()  # greedy and sampling variants
    after = [np.asarray(a)[1:] for a in jax.tree.leaves(eng.executor.kv.pools)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    more = mixed_requests(model, 4, seed=4)
    assert serve(eng, more, arrive_every=1) == reference(model, more)


def test_copy_on_write_is_warmed(model):
    # n > 1 samples share their prompt's last block until each appends: copy-on-write copies of varying counts
    eng = jkv.Engine(model, **SMALL)
    eng.warmup(greedy=False)
    size = copy_blocks.cache_size()
    prompt = list(range(1, 12))  # 11 tokens: the last block is partly filled, so the forks copy it
    for seed in range(3):
        eng.add_request(prompt, jkv.SamplingParams(max_tokens=5, n=3 - seed % 2, temperature=1.0, seed=seed))
    eng.run()
    assert copy_blocks.cache_size() == size


def test_warmup_refuses_a_busy_engine(model):
    eng = jkv.Engine(model, **SMALL)
    eng.add_request([1, 2, 3], jkv.SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="idle engine"):
        eng.warmup()
    assert len(eng.run()) == 1  # the request is served normally afterwards


def test_pallas_prefill_takes_one_width(model):
    # the Pallas prefill kernel loops to each row's length: every prefill shape uses the longest width
    eng = jkv.Engine(model, **(SMALL | {"attention": "interpret"}))
    widths = {shape[2] for kind, _, shape in eng.step_shapes() if kind == "prefill"}
    assert widths == {64 // 8}
    ref = jkv.Engine(model, **SMALL)
    assert len({shape[2] for kind, _, shape in ref.step_shapes() if kind == "prefill"}) > 1
    decode_widths = {shape[2] for kind, _, shape in eng.step_shapes() if kind == "decode"}
    assert decode_widths == {1, 2, 4, 8}  # decode keeps tight widths: its kernel splits work by them


def swap_workload(model):
    """Requests that outgrow a small pool: the engine swaps sequences out and back in, with varying block counts."""
    rng = np.random.default_rng(1)  # with 18 blocks: swaps of 3 and 5 blocks (not powers of two)
    return [(rng.integers(0, model.config.vocab_size, int(rng.integers(3, 40))).tolist(), int(rng.integers(8, 24)))
            for _ in range(10)]  # fmt: skip


@pytest.mark.parametrize("chunk", [None, 2])
def test_swapping_is_warmed_and_chunked(model, chunk):
    # after warmup() a swap-heavy workload compiles nothing (any block count moves in power-of-two calls of at
    # most swap_chunk blocks), and the tokens are the dense reference's; chunk 2 splits every swap into pieces
    # (the 3- and 5-block swaps into 2 + 1 and 2 + 2 + 1)
    opts = SMALL | {"preemption_mode": "swap", "swap_blocks": 64}
    eng = jkv.Engine(model, **opts)
    if chunk:
        eng.executor.kv.swap_chunk = chunk
    eng.warmup(greedy=True)
    reqs = swap_workload(model)
    events, stop = backend_compiles()
    try:
        got = serve(eng, reqs, arrive_every=1)
    finally:
        stop()
    stats = eng.stats()
    assert stats.preemptions_swap > 0 and stats.swap_bytes > 0
    assert events == [], f"{len(events)} compilations while serving"
    assert got == reference(model, reqs)
    assert stats.blocks_used == 0


def test_swap_chunk_is_a_bounded_power_of_two(model, monkeypatch):
    from jkv import kv_cache

    opts = SMALL | {"preemption_mode": "swap", "swap_blocks": 8}
    kv = jkv.Engine(model, **opts).executor.kv
    per_seq = -(-SMALL["max_seq_len"] // SMALL["block_size"])  # 8 blocks hold the longest sequence
    assert kv.swap_chunk == per_seq
    # the staging bound: larger blocks (or a smaller bound) leave room for fewer blocks per call
    assert kv.swap_chunk * kv.bytes_per_block <= kv_cache.SWAP_STAGING_BYTES
    monkeypatch.setattr(kv_cache, "SWAP_STAGING_BYTES", 3 * kv.bytes_per_block)
    assert jkv.Engine(model, **opts).executor.kv.swap_chunk == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_progress_reports_every_shape_in_order(model, threads):
    eng = jkv.Engine(model, decode_steps=4, **SMALL)  # its shapes were compiled (by another engine) or are now
    seen = []
    report = eng.warmup(greedy=True, threads=threads, progress=lambda done, total: seen.append((done, total)))
    total = report["shapes"]
    assert total > 10 and seen == [(i, total) for i in range(1, total + 1)]
    seen.clear()
    eng.warmup(greedy=True, progress=lambda done, total: seen.append((done, total)))
    assert seen == []  # nothing left to compile, nothing reported


def test_warmup_rejects_a_progress_that_is_not_callable(model):
    eng = jkv.Engine(model, **SMALL)
    with pytest.raises(ValueError, match="function of \\(done, total\\)"):
        eng.warmup(progress=5)
    assert eng.executor.runner.compiled == set() and eng.stats().compilations == 0  # refused before compiling
