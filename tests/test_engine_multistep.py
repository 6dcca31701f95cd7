"""Multi-step decode in the engine (`Engine(decode_steps=K)`): K decode steps per device call give exactly the
tokens, finish reasons and counts of one step per call, under every engine feature, in async and sync mode.

The scenarios are test_engine_async's; `drive` runs one through an engine and returns what a user sees (it also
checks that every block comes back, that no placeholder token is ever reported and that the streamed tokens add
up to the final output).
"""
# ruff: noqa: F811  (the fixtures imported below are taken as test arguments)

import numpy as np
import pytest

# the scenarios' model, prompts and greedy references are test_engine_async's fixtures
from test_engine_async import ENGINE, PREEMPT, SP, _CountingNumpy, drive, greedy10, model, prompts  # noqa: F401

import jkv
import jkv.executor as executor_module
from jkv.reference import reference_generate


# Each K compiles its own multi-step programs: the scenarios run K = 4 and, where a longer round matters, 8.
def multi_vs_single(model, plan, steps=(4,), **opts):
    """The plan through decode_steps=1 (sync) and decode_steps=K (async and sync): the same results."""
    want, single, _ = drive(model, plan, async_scheduling=False, **opts)
    engines = []
    for k in steps:
        for mode in (True, False):
            got, eng, _ = drive(model, plan, async_scheduling=mode, decode_steps=k, **opts)
            assert got == want, f"decode_steps={k}, async_scheduling={mode}"
            assert eng.stats().step <= single.stats().step + 1  # never more rounds (+1: async reads the last)
            engines.append(eng)
    return want, engines


def multi_calls(eng) -> int:
    return sum(1 for key in eng.executor.runner.compiled if key[1] == "steps")


def test_greedy_matches_reference_and_uses_fewer_calls(model, prompts, greedy10):
    plan = [(0, p, SP(max_tokens=10)) for p in prompts]
    res, engines = multi_vs_single(model, plan, steps=(4, 8))
    assert [res["samples"][f"r{i}"][0][0] for i in range(len(prompts))] == greedy10
    _, single, _ = drive(model, plan, async_scheduling=True)
    for eng in engines:
        assert multi_calls(eng) > 0  # the multi-step program ran
        assert eng.stats().step <= single.stats().step - 4  # fewer step() calls for the same tokens


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 0.9), (1.3, 20, 1.0)])
def test_seeded_sampling(model, prompts, temperature, top_k, top_p):
    plan = [(0, p, SP(max_tokens=9, temperature=temperature, top_k=top_k, top_p=top_p, seed=100 + i))
            for i, p in enumerate(prompts)]  # fmt: skip
    multi_vs_single(model, plan)


def test_stop_tokens_inside_a_round(model, prompts, greedy10):
    stops = (greedy10[2][4], greedy10[5][1], greedy10[8][6])
    plan = [(0, p, SP(max_tokens=10, stop_token_ids=stops)) for p in prompts]
    plan += [(0, p, SP(max_tokens=10, stop_token_ids=stops, temperature=0.9, seed=i)) for i, p in enumerate(prompts)]
    res, _ = multi_vs_single(model, plan, steps=(4, 8))
    assert list(res["finish"].values()).count("stop") >= 4


def test_stop_token_that_is_also_the_last_token(model, prompts, greedy10):
    stop = greedy10[3][4]
    k = greedy10[3].index(stop) + 1
    res, _ = multi_vs_single(model, [(0, prompts[3], SP(max_tokens=k, stop_token_ids=[stop]))], steps=(4, 8))
    assert res["samples"]["r0"] == [(greedy10[3][:k], "stop")]


def test_max_tokens_and_late_arrivals(model, prompts):
    plan = [(i % 4 * 3, p, SP(max_tokens=1 + (i * 3) % 11)) for i, p in enumerate(prompts)]
    plan += [(5, prompts[9], SP(max_tokens=1)), (6, prompts[0], SP(max_tokens=2, temperature=1.0, seed=3))]
    res, _ = multi_vs_single(model, plan, steps=(4, 8))
    assert res["tokens_generated"] == sum(sp.max_tokens for _, _, sp in plan)


def test_prefix_caching_sees_real_tokens_only(model):
    rng = np.random.default_rng(5)
    shared = rng.integers(0, 1000, 20).tolist()
    ps = [shared + rng.integers(0, 1000, n).tolist() for n in (1, 4, 9, 13)]
    plan = [(0, ps[0], SP(max_tokens=12))] + [(3 * i, p, SP(max_tokens=8)) for i, p in enumerate(ps[1:], 1)]
    res, _ = multi_vs_single(model, plan)
    # a later prompt = an earlier prompt + its output: it hits blocks filled by multi-step rounds, whose tokens
    # were placeholders when their slots were handed out (hashing a placeholder would miss, or worse, hit wrong)
    first = res["samples"]["r0"][0][0]
    plan2 = plan + [(12, ps[0] + first[:9], SP(max_tokens=4))]
    _, without = multi_vs_single(model, plan, steps=(4,))
    res2, engines = multi_vs_single(model, plan2, steps=(4,))
    assert res2["samples"]["r4"][0][0] == reference_generate(model, [ps[0] + first[:9]], max_tokens=4)[0]
    for eng, base in zip(engines, without, strict=True):
        # r4's 30-token prompt hits r0's 7 full blocks: 21 prompt tokens and 7 tokens that multi-step rounds wrote
        # (the manager must hold their real values, not the placeholders it handed out)
        assert eng.manager.stats.prefix_hit_tokens - base.manager.stats.prefix_hit_tokens == 28


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption(model, prompts, greedy10, mode):
    stops = (greedy10[2][4], greedy10[8][6])
    plan = [(0, p, SP(max_tokens=10, stop_token_ids=stops if i % 2 else ())) for i, p in enumerate(prompts)]
    plan += [(2, prompts[4], SP(max_tokens=10, temperature=0.7, seed=9))]
    _, engines = multi_vs_single(model, plan, **PREEMPT, preemption_mode=mode, swap_blocks=64 if mode == "swap" else 0)
    for eng in engines:
        st = eng.stats()
        assert (st.preemptions_swap if mode == "swap" else st.preemptions_recompute) > 0


def test_parallel_samples_and_beams(model, prompts, greedy10):
    plan = [(0, p, SP(max_tokens=8)) for p in prompts[:6]]
    plan += [
        (1, prompts[6], SP(max_tokens=7, n=3, temperature=1.0, seed=4)),
        (2, prompts[7], SP(max_tokens=6, beam_width=3)),  # rounds with a beam row run one step
        (4, prompts[8], SP(max_tokens=6, n=2)),
        (5, prompts[9], SP(max_tokens=5, beam_width=2, n=2, stop_token_ids=[greedy10[9][2]])),
    ]
    res, _ = multi_vs_single(model, plan)
    assert res["samples"]["r8"] == [(greedy10[8][:6], "length")] * 2


def test_sliding_window(model, prompts):
    multi_vs_single(model, [(0, p, SP(max_tokens=20)) for p in prompts], steps=(4, 8), sliding_window=8,
                    num_blocks=80)  # fmt: skip


def test_random_workloads(model):
    # random plans on the scenarios' engines and K values (see test_engine_async's random workloads)
    rng = np.random.default_rng(8)
    for trial in range(3):
        plan = []
        for i in range(14):
            kind = rng.integers(0, 8)
            prompt = rng.integers(0, 1000, int(rng.integers(1, 40))).tolist()
            sp = {"max_tokens": int(rng.integers(1, 20)), "stop_token_ids": tuple(int(t) for t in rng.integers(0, 1000, 30))}
            if kind == 1:
                sp |= {"temperature": float(rng.uniform(0.5, 1.5)), "top_k": int(rng.integers(0, 50)), "seed": i}
            elif kind == 2:
                sp |= {"n": int(rng.integers(2, 4)), "temperature": 1.0, "seed": i}
            elif kind == 3:
                sp |= {"beam_width": 2}
            plan.append((int(rng.integers(0, 12)), prompt, SP(**sp)))
        opts = (ENGINE, PREEMPT)[trial % 2] | {"max_num_batched_tokens": int(rng.choice([16, 64]))}
        multi_vs_single(model, plan, steps=(int(rng.choice([4, 8])),), **opts)


def test_abort_during_a_round(model, prompts, greedy10):
    plan = [(0, p, SP(max_tokens=10)) for p in prompts[:6]]
    for mode in (True, False):
        res, eng, streamed = drive(model, plan, async_scheduling=mode, decode_steps=4, abort_at={1: 2, 4: 1})
        assert eng.aborted == {"r1": True, "r4": True}
        for i in (1, 4):  # aborted with a round in flight: reported finished, its tokens a prefix of the full output
            rid = f"r{i}"
            assert res["finish"][rid] == "aborted"
            ((tokens, _),) = res["samples"][rid]
            assert streamed[rid] == tokens == greedy10[i][: len(tokens)] and len(tokens) < 10
            assert jkv.request.UNKNOWN_TOKEN not in tokens  # the round's placeholder slots were dropped
        for i in (0, 2, 3, 5):
            assert res["samples"][f"r{i}"] == [(greedy10[i], "length")]


def test_round_reads_back_once_and_falls_back_when_blocks_are_short(model, prompts, monkeypatch):
    eng = jkv.Engine(model, **ENGINE, decode_steps=4)
    for p in prompts[:8]:
        eng.add_request(p, SP(max_tokens=20, ignore_eos=True))
    # prefill (76 prompt tokens, at most 64 padded positions a round), then the first multi-step round of all 8
    while (eng.last_decode_rows, eng.last_decode_steps) != (8, 4):
        eng.step()
        assert eng.stats().step < 10
    flight = eng.executor._flight
    assert flight is not None and flight.parts[0].steps is not None and eng.last_decode_steps == 4
    running = eng.scheduler.requests.values()
    assert len(running) == 8 and all(s.tokens[-3:] == [jkv.request.UNKNOWN_TOKEN] * 3 for r in running for s in r.seqs)
    log: list = []
    eng.events = log
    monkeypatch.setattr(executor_module, "np", _CountingNumpy(log))
    eng.step()  # the next round: dispatched before the last is read, one device->host copy for 4 x 8 tokens
    assert [k for k, _ in log] == ["dispatch", "read", "host read"]
    monkeypatch.undo()
    # too few free blocks for the extra slots: the round runs one step (two sequences of 47 and 48 tokens need
    # 12 blocks each, the pool has 23: near their end the 7 lookahead slots of each do not fit)
    tight = jkv.Engine(model, **PREEMPT, decode_steps=8, watermark=0.0)
    for p in (prompts[2], prompts[3]):
        tight.add_request(p, SP(max_tokens=40, ignore_eos=True))
    out = tight.run()
    assert len(out) == 2 and all(len(o.token_ids) == 40 for o in out.values())


def test_decode_steps_must_be_positive(model):
    with pytest.raises(ValueError, match="decode_steps"):
        jkv.Engine(model, num_blocks=16, block_size=4, decode_steps=0)


def test_generate_runs_multi_step_by_default(model, prompts, greedy10, monkeypatch):
    made = []
    real = jkv.engine.Engine

    class Spy(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(jkv.engine, "Engine", Spy)
    outs = jkv.generate(model, prompts[:4], SP(max_tokens=10), **ENGINE)
    assert [o.token_ids for o in outs] == greedy10[:4]
    assert made[-1].decode_steps == jkv.engine.GENERATE_DECODE_STEPS > 1 and multi_calls(made[-1]) > 0
    jkv.generate(model, prompts[:2], SP(max_tokens=3), **ENGINE, decode_steps=1)
    assert made[-1].decode_steps == 1
