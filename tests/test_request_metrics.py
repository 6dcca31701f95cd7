"""Per-request latency (`RequestOutput.metrics`): stamped when a step first reports a request's first token and
its finish, consistent with the tokens reported, in every decode mode."""

import time
from pathlib import Path

import numpy as np
import pytest

import jkv

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
# One engine configuration for every test: engines with the same pool and rows share their compiled steps.
ENGINE = {"num_blocks": 64, "block_size": 4, "max_num_seqs": 2}


@pytest.fixture(scope="module")
def model():
    return jkv.load_model(FIXTURE, dtype="float32")


def test_metrics_arithmetic():
    m = jkv.RequestMetrics(arrival_time=10.0, first_token_time=10.5, finish_time=12.5, num_output_tokens=5)
    assert m.time_to_first_token == pytest.approx(0.5)
    assert m.time_per_output_token == pytest.approx(0.5)  # 2 s over the 4 tokens after the first
    assert m.latency == pytest.approx(2.5)
    one = jkv.RequestMetrics(10.0, 10.5, 10.5, 1)
    assert one.time_per_output_token is None  # no gap between tokens to measure
    assert jkv.RequestMetrics(10.0, None, None, 0).time_to_first_token is None


@pytest.mark.parametrize("opts", [{"async_scheduling": False}, {"async_scheduling": True},
                                  {"decode_steps": 4}])  # fmt: skip
def test_metrics_follow_the_reported_tokens(model, opts):
    rng = np.random.default_rng(5)
    eng = jkv.Engine(model, **ENGINE, **opts)
    lengths = {"a": 6, "b": 9, "c": 3}  # three requests, two rows: c waits for a row
    t_add = time.monotonic()
    for rid, n in lengths.items():
        prompt = rng.integers(0, model.config.vocab_size, 5).tolist()
        eng.add_request(prompt, jkv.SamplingParams(max_tokens=n, ignore_eos=True), request_id=rid)
    first_seen, finished_seen, last = {}, {}, {}
    while eng.has_unfinished():
        before = time.monotonic()
        outs = eng.step()
        after = time.monotonic()
        for o in outs:
            m = o.metrics
            assert m.num_output_tokens == len(o.token_ids)
            if o.token_ids and o.request_id not in first_seen:  # the step that first reports a token stamps it
                first_seen[o.request_id] = m.first_token_time
                assert before <= m.first_token_time <= after
            if o.finished and o.request_id not in finished_seen:
                finished_seen[o.request_id] = m.finish_time
                assert before <= m.finish_time <= after
            last[o.request_id] = o
    assert set(last) == set(lengths)
    for rid, o in last.items():
        m = o.metrics
        assert o.finished and len(o.token_ids) == lengths[rid]
        assert t_add <= m.arrival_time <= m.first_token_time <= m.finish_time
        assert (m.first_token_time, m.finish_time) == (first_seen[rid], finished_seen[rid])  # stamped once
        assert m.time_per_output_token == pytest.approx((m.finish_time - m.first_token_time) / (lengths[rid] - 1))
        assert m.latency == pytest.approx(m.finish_time - m.arrival_time)
    # c could start only after a or b left: its first token came after theirs
    assert last["c"].metrics.first_token_time >= min(last["a"].metrics.finish_time, last["b"].metrics.finish_time)


def test_generate_returns_metrics(model):
    t0 = time.monotonic()
    outs = jkv.generate(model, [[1, 2, 3], [], [4, 5]], jkv.SamplingParams(max_tokens=3, ignore_eos=True),
                        **ENGINE, decode_steps=4)  # fmt: skip
    bad = outs.pop(1)  # an empty prompt fails alone, and still says when
    assert bad.error and bad.metrics.num_output_tokens == 0 and bad.metrics.time_to_first_token is None
    assert t0 <= bad.metrics.arrival_time == bad.metrics.finish_time
    for o in outs:
        m = o.metrics
        assert m.num_output_tokens == 3
        assert t0 <= m.arrival_time <= m.first_token_time <= m.finish_time <= time.monotonic()


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_finished_only_steps_give_the_same_results_and_first_token_times(model, decode_steps):
    # step(finished_only=True) (what run() uses) reports only finished requests, yet their tokens are the full
    # outputs, and every request's first-token time is stamped in the step that first read its token (the step
    # whose monotonic-clock window holds the stamp: the windows of successive steps are disjoint and ordered)
    rng = np.random.default_rng(5)
    reqs = [(rng.integers(0, model.config.vocab_size, int(rng.integers(2, 20))).tolist(), int(rng.integers(2, 12)))
            for _ in range(6)]  # fmt: skip
    runs = {}
    for finished_only in (False, True):
        eng = jkv.Engine(model, **ENGINE, decode_steps=decode_steps)
        ids = [eng.add_request(p, jkv.SamplingParams(max_tokens=n)) for p, n in reqs]
        final, windows, reported = {}, [], []
        while eng.has_unfinished():
            before = time.monotonic()
            outs = eng.step(finished_only=finished_only)
            windows.append((before, time.monotonic()))
            reported += [o.finished for o in outs]
            for o in outs:
                if o.finished:
                    final[o.request_id] = o
        assert all(final[r].metrics.time_to_first_token is not None for r in ids)
        first_step = [next(k for k, (lo, hi) in enumerate(windows) if lo <= final[r].metrics.first_token_time <= hi)
                      for r in ids]  # fmt: skip
        runs[finished_only] = ([final[r].token_ids for r in ids], first_step, reported)
    (tok_all, first_all, rep_all), (tok_fin, first_fin, rep_fin) = runs[False], runs[True]
    assert tok_all == tok_fin and first_all == first_fin
    assert all(rep_fin) and len(rep_fin) == len(reqs) and not all(rep_all)  # only finished outputs were built
