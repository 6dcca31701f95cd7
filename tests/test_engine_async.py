"""Async scheduling: the engine that dispatches step n+1 before reading step n's tokens gives exactly what the
synchronous engine gives (tokens, finish reasons, counts) under every engine feature, and it does not block."""

from pathlib import Path

import jax
import numpy as np
import pytest

import jkv
import jkv.executor as executor_module
from jkv.reference import reference_generate

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
SP = jkv.SamplingParams

# A compiled step is shared by every engine with the same pool shape, token buffer and step shape (jkv/runner.py
# `_JITTED`); a different num_blocks or max_num_seqs compiles everything again. The scenarios (here and in
# test_engine_multistep) run on two configurations: ENGINE, a pool that holds them, and PREEMPT, one that does not.
ENGINE = {"num_blocks": 120, "block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 64}
PREEMPT = ENGINE | {"num_blocks": 24}


@pytest.fixture(scope="module")
def model():
    return jkv.load_model(FIXTURE, dtype="float32")


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(11)
    lengths = [1, 3, 7, 8, 9, 15, 16, 17, 30, 45]
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def greedy10(model, prompts):
    return reference_generate(model, prompts, max_tokens=10)


def drive(model, plan, *, async_scheduling, abort_at=None, **opts):
    """Run `plan` = [(step to arrive at, prompt, SamplingParams)] through one engine; return what a user sees.

    abort_at: {request index: number of streamed tokens after which it is aborted}; `eng.aborted` holds, by id,
    what `abort` returned.
    """
    opts = ENGINE | opts
    eng = jkv.Engine(model, async_scheduling=async_scheduling, **opts)
    assert eng.async_scheduling is async_scheduling
    ids: dict[int, str] = {}
    sampling: dict[str, jkv.SamplingParams] = {}
    streamed: dict[str, list[int]] = {}
    final: dict[str, jkv.RequestOutput] = {}
    abort_at = abort_at or {}
    eng.aborted = {}
    steps = 0
    eng.decode_rows_total = 0  # decode rows over the run: equal in both modes unless a stop token fired
    while len(ids) < len(plan) or eng.has_unfinished():
        for i, (at, prompt, sp) in enumerate(plan):
            if at == steps and i not in ids:
                try:
                    ids[i] = eng.add_request(prompt, sp, request_id=f"r{i}")
                except ValueError as err:  # can never fit: the same in both modes
                    ids[i] = f"r{i}"
                    final[ids[i]] = jkv.RequestOutput(ids[i], prompt, [], [], None, True, "error", [],
                                                      error=str(err))  # fmt: skip
                sampling[ids[i]] = sp
                streamed[ids[i]] = []
        outs = eng.step()
        eng.decode_rows_total += eng.last_decode_rows
        for out in outs:
            assert out.request_id not in final, "a request reported after it finished"
            assert all(t >= 0 for smp in out.samples for t in smp.token_ids), "a placeholder token leaked"
            streamed[out.request_id] += out.new_token_ids
            if out.finished:
                final[out.request_id] = out
        for i, n in abort_at.items():
            rid = ids.get(i)
            if rid is not None and rid not in final and rid not in eng.aborted and len(streamed[rid]) >= n:
                eng.aborted[rid] = eng.abort(rid)
        steps += 1
        assert steps < 2000
    stats = eng.stats()
    assert stats.blocks_used == 0 and not eng.has_unfinished()  # every block came back
    assert not eng.scheduler.requests  # finished requests are not kept
    assert set(final) == {f"r{i}" for i in range(len(plan))}  # every request is reported finished, aborted too
    result = {
        "samples": {rid: [(s.token_ids, s.finish_reason) for s in out.samples] for rid, out in final.items()},
        "finish": {rid: out.finish_reason for rid, out in final.items()},
        "tokens_generated": stats.tokens_generated,
    }
    for rid, out in final.items():
        if out.error is None and sampling[rid].beam_width == 1:  # beam search streams nothing until it ends
            assert streamed[rid] == out.token_ids, f"streamed tokens of {rid} differ from its final output"
    return result, eng, streamed


def both(model, plan, **opts):
    a, eng_a, _ = drive(model, plan, async_scheduling=True, **opts)
    s, eng_s, _ = drive(model, plan, async_scheduling=False, **opts)
    assert a == s
    return a, eng_a, eng_s


def test_async_is_the_default(model):
    assert jkv.Engine(model, num_blocks=16, block_size=4).async_scheduling is True


def test_greedy_matches_sync_and_reference(model, prompts, greedy10):
    res, eng_a, eng_s = both(model, [(0, p, SP(max_tokens=10)) for p in prompts])
    assert [res["samples"][f"r{i}"][0][0] for i in range(len(prompts))] == greedy10
    assert res["tokens_generated"] == 10 * len(prompts)
    # no stop token fired: the schedule itself is the synchronous one (same steps, prefix hits, fragmentation)
    sa, ss = eng_a.stats(), eng_s.stats()
    assert (sa.prefix_hit_rate, sa.preemptions_recompute) == (ss.prefix_hit_rate, 0)
    assert eng_a.executor.runner.compiled == eng_s.executor.runner.compiled  # the same step shapes
    assert sa.step == ss.step + 1  # one more call reads the last step's tokens
    assert eng_a.decode_rows_total == eng_s.decode_rows_total  # nothing scheduled past max_tokens


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 0.9), (1.3, 20, 1.0)])
def test_seeded_sampling_matches_sync(model, prompts, temperature, top_k, top_p):
    plan = [(0, p, SP(max_tokens=9, temperature=temperature, top_k=top_k, top_p=top_p, seed=100 + i))
            for i, p in enumerate(prompts)]  # fmt: skip
    both(model, plan)


def test_stop_tokens_mid_run(model, prompts, greedy10):
    # stop ids that the greedy outputs do produce, at various positions: requests stop at different steps
    stops = (greedy10[2][4], greedy10[5][1], greedy10[8][6])
    plan = [(0, p, SP(max_tokens=10, stop_token_ids=stops)) for p in prompts]
    plan += [(0, p, SP(max_tokens=10, stop_token_ids=stops, temperature=0.9, seed=i))
             for i, p in enumerate(prompts)]  # fmt: skip
    res, _, _ = both(model, plan)
    reasons = list(res["finish"].values())
    assert reasons.count("stop") >= 4 and reasons.count("length") >= 2
    for i, ref in enumerate(greedy10):  # the greedy ones: cut after the first stop token
        cut = next((k + 1 for k, t in enumerate(ref) if t in stops), len(ref))
        assert res["samples"][f"r{i}"][0][0] == ref[:cut]


def test_stop_token_that_is_also_the_last_token(model, prompts, greedy10):
    # max_tokens == the position of the stop token: the request is released early by length, then its last
    # token turns out to be a stop token: the reason must be 'stop', as in the synchronous engine
    stop = greedy10[3][4]
    k = greedy10[3].index(stop) + 1
    res, _, _ = both(model, [(0, prompts[3], SP(max_tokens=k, stop_token_ids=[stop]))])
    assert res["samples"]["r0"] == [(greedy10[3][:k], "stop")]


def test_max_tokens_stops_and_late_arrivals(model, prompts):
    # max_tokens 1 (the prefill's token is the last), 2, ...; requests arriving while others decode (12 requests,
    # 8 rows: some wait for a row)
    plan = [(i % 4 * 3, p, SP(max_tokens=1 + (i * 3) % 11)) for i, p in enumerate(prompts)]
    plan += [(5, prompts[9], SP(max_tokens=1)), (6, prompts[0], SP(max_tokens=2, temperature=1.0, seed=3))]
    res, eng_a, eng_s = both(model, plan)
    assert all(r == "length" for r in res["finish"].values())
    assert res["tokens_generated"] == sum(sp.max_tokens for _, _, sp in plan)
    assert eng_a.stats().prefix_hit_rate == eng_s.stats().prefix_hit_rate
    assert eng_a.decode_rows_total == eng_s.decode_rows_total  # a request is never scheduled past max_tokens


def test_prefix_caching_matches_sync(model):
    rng = np.random.default_rng(5)
    shared = rng.integers(0, 1000, 20).tolist()
    ps = [shared + rng.integers(0, 1000, n).tolist() for n in (1, 4, 9, 13)]
    # the first prompt's output blocks are cached while it decodes; later ones extend its full text
    plan = [(0, ps[0], SP(max_tokens=12))] + [(3 * i, p, SP(max_tokens=8)) for i, p in enumerate(ps[1:], 1)]
    res, eng_a, eng_s = both(model, plan)
    assert eng_a.stats().prefix_hit_rate == eng_s.stats().prefix_hit_rate > 0.3
    # a request whose prompt is an earlier request's prompt + output hits blocks holding generated tokens,
    # i.e. blocks whose last token was read back from the device after its slot was handed out
    first = res["samples"]["r0"][0][0]
    plan2 = plan + [(40, ps[0] + first[:9], SP(max_tokens=4))]
    res2, eng_a2, _ = both(model, plan2)
    assert res2["samples"]["r4"][0][0] == reference_generate(model, [ps[0] + first[:9]], max_tokens=4)[0]
    assert eng_a2.manager.stats.prefix_hit_tokens >= eng_a.manager.stats.prefix_hit_tokens + 28


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_matches_sync(model, prompts, greedy10, mode):
    stops = (greedy10[2][4], greedy10[8][6])
    plan = [(0, p, SP(max_tokens=10, stop_token_ids=stops if i % 2 else ())) for i, p in enumerate(prompts)]
    plan += [(2, prompts[4], SP(max_tokens=10, temperature=0.7, seed=9))]
    res, eng_a, eng_s = both(model, plan, **PREEMPT, preemption_mode=mode, swap_blocks=64 if mode == "swap" else 0)
    for eng in (eng_a, eng_s):
        st = eng.stats()
        assert (st.preemptions_swap if mode == "swap" else st.preemptions_recompute) > 0
    for i in range(0, len(prompts), 2):
        assert res["samples"][f"r{i}"][0][0] == greedy10[i]


def test_parallel_samples_and_beams_mixed_in(model, prompts, greedy10):
    plan = [(0, p, SP(max_tokens=8)) for p in prompts[:6]]
    plan += [
        (1, prompts[6], SP(max_tokens=7, n=3, temperature=1.0, seed=4)),
        (2, prompts[7], SP(max_tokens=6, beam_width=3)),
        (4, prompts[8], SP(max_tokens=6, n=2)),  # greedy forks
        (5, prompts[9], SP(max_tokens=5, beam_width=2, n=2, stop_token_ids=[greedy10[9][2]])),
    ]
    res, _, _ = both(model, plan)  # 16 sequences over 8 rows: some requests wait for theirs
    assert len(res["samples"]["r6"]) == 3 and len(res["samples"]["r9"]) == 2
    assert res["samples"]["r8"] == [(greedy10[8][:6], "length")] * 2


def test_abort_mid_run(model, prompts, greedy10):
    plan = [(0, p, SP(max_tokens=10)) for p in prompts[:6]]
    plan += [(0, prompts[6], SP(max_tokens=10, n=2, temperature=1.0, seed=1))]
    aborted = ("r1", "r4", "r6")
    outs = {}
    for mode in (True, False):
        res, eng, streamed = drive(model, plan, async_scheduling=mode, abort_at={1: 2, 4: 5, 6: 1})
        outs[mode] = res
        assert eng.aborted == dict.fromkeys(aborted, True)
        for rid in aborted:  # reported finished, 'aborted', short of max_tokens; what streamed is all it reports
            assert res["finish"][rid] == "aborted" and len(streamed[rid]) < 10
            assert all(len(tokens) < 10 for tokens, _ in res["samples"][rid])
        for i in (1, 4):  # what streamed is a prefix of the full output (drive: == the final output's tokens)
            assert streamed[f"r{i}"] == greedy10[i][: len(streamed[f"r{i}"])]
        for i in (0, 2, 3, 5):
            assert res["samples"][f"r{i}"] == [(greedy10[i], "length")]
    # the stream lags one step in async mode, so the aborts land later; everything not aborted is the same
    kept = {mode: {rid: v for rid, v in res["samples"].items() if rid not in aborted} for mode, res in outs.items()}
    assert kept[True] == kept[False]


def test_sliding_window_matches_sync(model, prompts):
    plan = [(0, p, SP(max_tokens=20)) for p in prompts]
    both(model, plan, sliding_window=8, num_blocks=80)


def test_random_workloads_match_sync(model):
    # random plans on the scenarios' engines (the block sizes are covered by test_engine), either prefill budget
    rng = np.random.default_rng(7)
    for trial in range(3):
        plan = []
        for i in range(14):
            kind = rng.integers(0, 8)
            prompt = rng.integers(0, 1000, int(rng.integers(1, 40))).tolist()
            stops = tuple(int(t) for t in rng.integers(0, 1000, 30))  # ~3 % of tokens stop a request
            sp = {"max_tokens": int(rng.integers(1, 14)), "stop_token_ids": stops}
            if kind == 1:
                sp |= {"temperature": float(rng.uniform(0.5, 1.5)), "top_k": int(rng.integers(0, 50))}
                sp["seed"] = i
            elif kind == 2:
                sp |= {"n": int(rng.integers(2, 4)), "temperature": 1.0, "seed": i}
            elif kind == 3:
                sp |= {"beam_width": 2}
            plan.append((int(rng.integers(0, 12)), prompt, SP(**sp)))
        both(model, plan, **((ENGINE, PREEMPT)[trial % 2] | {"max_num_batched_tokens": int(rng.choice([16, 64]))}))


def test_stream_reports_each_token_once(model, prompts):
    eng = jkv.Engine(model, **ENGINE)
    rids = [eng.add_request(p, SP(max_tokens=6, n=2, temperature=1.0, seed=i))
            for i, p in enumerate(prompts[:4])]  # fmt: skip
    seen = {r: [] for r in rids}
    final = {}
    for out in eng.stream():
        seen[out.request_id] += out.new_token_ids
        assert out.token_ids[: len(seen[out.request_id])] == seen[out.request_id]
        if out.finished:
            final[out.request_id] = out
    assert all(seen[r] == final[r].token_ids and len(final[r].samples) == 2 for r in rids)


class _CountingNumpy:
    """Stands in for `np` inside jkv.executor: counts device -> host reads of jax arrays."""

    def __init__(self, log):
        self._log = log

    def __getattr__(self, name):
        return getattr(np, name)

    def asarray(self, a, *args, **kwargs):
        if isinstance(a, jax.Array):
            self._log.append(("host read", None))
        return np.asarray(a, *args, **kwargs)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_host_does_not_wait_between_decode_steps(model, prompts, monkeypatch, async_scheduling):
    eng = jkv.Engine(model, **ENGINE, async_scheduling=async_scheduling)
    for p in prompts[:8]:
        eng.add_request(p, SP(max_tokens=20, ignore_eos=True))
    while eng.last_decode_rows < 8:  # prefill: 76 prompt tokens, at most 64 padded positions a round
        eng.step()
        assert eng.stats().step < 10
    log: list = []
    eng.events = log
    monkeypatch.setattr(executor_module, "np", _CountingNumpy(log))
    for _ in range(6):  # steady decode: 8 running sequences, nothing to prefill
        first = len(log)
        eng.step()
        kinds = [k for k, _ in log[first:]]
        assert kinds.count("host read") == 1, kinds  # one device->host copy per step: the token buffer
        assert eng.last_decode_rows == 8
        if async_scheduling:
            # this step was dispatched before the previous one's tokens were read
            assert kinds == ["dispatch", "read", "host read"], kinds
            (_, n), (_, m) = log[first], log[first + 1]
            assert m == n - 1
        else:
            assert kinds == ["dispatch", "read", "host read"] and log[first][1] == log[first + 1][1]


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_synchronize_waits_for_the_flight_and_changes_nothing(model, prompts, decode_steps):
    """Engine.synchronize: afterwards the step in flight's arrays are ready; it reads nothing back, so the run
    that goes on gives the same tokens as one never synchronized."""
    def run(sync_at):
        eng = jkv.Engine(model, **ENGINE, decode_steps=decode_steps)
        for p in prompts[:4]:
            eng.add_request(p, SP(max_tokens=9, ignore_eos=True))
        outs, i = {}, 0
        while eng.has_unfinished():
            for o in eng.step():
                outs[o.request_id] = o.token_ids
            if i == sync_at:
                flight = eng.executor._flight
                assert flight is not None and eng.executor.busy  # async: this step's tokens are still unread
                eng.synchronize()
                assert eng.executor._flight is flight and flight.tokens.is_ready()
                assert all(p.steps.is_ready() for p in flight.parts if p.steps is not None)
                assert all(a.is_ready() for a in jax.tree.leaves(eng.executor.kv.pools))
            i += 1
        return outs

    assert run(sync_at=1) == run(sync_at=-1)
