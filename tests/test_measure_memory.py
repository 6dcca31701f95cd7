"""jkv.bench.search and jkv.bench.memory (scripts/measure_memory.py) without a GPU: the real-max-batch search, the
small-card emulation's ballast arithmetic, what one sequence costs the plan, and the parent's probe bookkeeping
(the children need nvidia-smi and a GPU)."""

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jkv.bench import child as harness
from jkv.bench import memory, search
from jkv.bench.probe import StepProbe
from planner import PlanOptions, load_config, make_plan

ROOT = Path(__file__).resolve().parents[1]

OOM = "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1234 bytes."


def threshold(t: int):
    """A card on which every batch up to t fits; the callable also records what it was asked."""
    asked = []

    def fits(b: int) -> tuple[bool, str]:
        asked.append(b)
        return (True, "ok") if b <= t else (False, OOM)

    fits.asked = asked
    return fits


def check_consistent(result, t: int) -> None:
    """Every recorded try agrees with the threshold, and no batch was tried twice."""
    assert all(ok == (b <= t) for b, ok, _ in result.tries)
    assert len({b for b, _, _ in result.tries}) == len(result.tries)
    assert all(msg == "ok" if ok else msg == OOM for _, ok, msg in result.tries)


def plan(model="gpt2", kv="bfloat16", hbm=24 * 10**9):
    return make_plan(load_config(model), PlanOptions(hbm_bytes=hbm, kv_dtype=kv))


# The search, one candidate at a time ------------------------------------------------------------------------
@pytest.mark.parametrize("planned, t", [(100, 117), (100, 101), (3891, 3925), (434, 439), (1, 5), (2, 2), (7, 50)])
def test_threshold_above_plan_is_found_exactly(planned, t):
    r = search.search_max_batch(threshold(t), planned)
    assert r.real_max == t and not r.cap_hit
    assert r.tries[0] == (planned, True, "ok")
    check_consistent(r, t)


def test_threshold_exactly_at_plan():
    r = search.search_max_batch(threshold(100), 100)
    assert r.real_max == 100 and not r.cap_hit
    assert [(b, ok) for b, ok, _ in r.tries] == [(100, True), (125, False), (112, False), (106, False), (103, False),
                                                 (101, False)]  # fmt: skip
    assert r.bounds == (100, 101)


def test_growth_is_geometric_then_bisects():
    r = search.search_max_batch(threshold(1000), 100)
    grown = [b for b, _, _ in r.tries[: 1 + [ok for _, ok, _ in r.tries].index(False)]]
    assert grown == [100, 125, 156, 195, 243, 303, 378, 472, 590, 737, 921, 1151]
    assert r.real_max == 1000 and len(r.tries) <= search.MAX_TRIES


@pytest.mark.parametrize("planned, t", [(100, 60), (100, 99), (3891, 3000), (434, 1), (2, 1)])
def test_plan_above_threshold_bisects_downward(planned, t):
    f = threshold(t)
    r = search.search_max_batch(f, planned)
    assert r.real_max == t and not r.cap_hit
    assert r.tries[0] == (planned, False, OOM)
    assert max(f.asked) == planned  # never above the plan once it failed
    check_consistent(r, t)


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("planned, t", [(7800, 7797), (7800, 7799), (859, 700), (10, 0), (2, 1)])
def test_gallop_down_from_a_plan_that_over_promised(planned, t, width):
    f = threshold(t)
    r = search.search_max_batch(f, planned, width=width, gallop_down=True)
    assert r.real_max == t and not r.cap_hit
    assert max(f.asked) == planned
    check_consistent(r, t)
    if t == planned - 1:
        assert [b for b, _, _ in r.tries][:2] == [planned, planned - 1]  # one step down, no halving from 0


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("planned, t", [(4176, 4177), (4176, 4181), (15427, 15430), (443, 444), (4176, 4300), (5, 5)])
def test_gallop_up_from_a_calibrated_plan(planned, t, width):
    f = threshold(t)
    r = search.search_max_batch(f, planned, first=planned + 1, width=width, growth=search.ROW_GROWTH, gallop_up=True)
    assert r.real_max == t and not r.cap_hit
    check_consistent(r, t)
    if t - planned <= 5:  # a few above the plan: found in a few tries, never a 1 % step above it
        assert max(f.asked) <= planned + 8
        assert len(r.tries) <= (7 if width == 1 else 8)
        plain = search.search_max_batch(threshold(t), planned, first=planned + 1, width=width, growth=search.ROW_GROWTH)
        assert len(r.tries) <= len(plain.tries)


def test_gallop_up_grows_no_faster_than_the_growth_step():
    r = search.search_max_batch(threshold(10**6), 100, gallop_up=True, max_tries=20)
    asked = [b for b, _, _ in r.tries]
    assert asked[:8] == [100, 101, 102, 104, 108, 116, 132, 164]  # offsets 1, 2, 4, ..., 64
    assert all(b2 <= max(b1 + 1, int(b1 * search.GROWTH)) for b1, b2 in itertools.pairwise(asked) if b2 > b1)
    assert all(ok for _, ok, _ in r.tries[:20])  # grew every time, capped by the 25 % step


def test_nothing_fits():
    r = search.search_max_batch(threshold(0), 10)
    assert r.real_max == 0 and not r.cap_hit and r.bounds == (0, 1)
    assert [b for b, _, _ in r.tries] == [10, 5, 2, 1]
    r = search.search_max_batch(threshold(0), 1)
    assert r.real_max == 0 and [b for b, _, _ in r.tries] == [1]


def test_cap_hit_while_growing():
    r = search.search_max_batch(threshold(10**9), 100, max_tries=24)
    assert r.cap_hit and len(r.tries) == 24
    assert r.real_max == (r.tries[-1][0], None) == r.bounds
    assert all(ok for _, ok, _ in r.tries)


def test_cap_hit_while_bisecting():
    r = search.search_max_batch(threshold(117), 100, max_tries=5)
    assert r.cap_hit and len(r.tries) == 5
    assert [(b, ok) for b, ok, _ in r.tries] == [(100, True), (125, False), (112, True), (118, False), (115, True)]
    assert r.real_max == (115, 118) == r.bounds
    check_consistent(r, 117)


def test_cap_hit_going_down():
    r = search.search_max_batch(threshold(3), 1000, max_tries=3)
    assert r.cap_hit and r.real_max == (0, 250)


def test_cap_of_one_try():
    assert search.search_max_batch(threshold(5), 5, max_tries=1) == search.BatchSearch((5, None), [(5, True, "ok")], True)
    assert search.search_max_batch(threshold(0), 1, max_tries=1).real_max == 0  # 1 failed: exact without another try


def test_exact_lands_on_the_last_try():
    full = search.search_max_batch(threshold(117), 100)
    again = search.search_max_batch(threshold(117), 100, max_tries=len(full.tries))
    assert again == full and not again.cap_hit


def test_first_step_is_tried_right_after_the_plan():
    r = search.search_max_batch(threshold(117), 100, first=128)
    assert [(b, ok) for b, ok, _ in r.tries][:2] == [(100, True), (128, False)]  # then bisects (100, 128)
    assert r.real_max == 117 and not r.cap_hit and max(b for b, _, _ in r.tries) == 128
    check_consistent(r, 117)


def test_first_step_that_fits_is_grown_from():
    r = search.search_max_batch(threshold(300), 100, first=120)
    assert [b for b, _, _ in r.tries][:4] == [100, 120, 150, 187]
    assert r.real_max == 300
    check_consistent(r, 300)


@pytest.mark.parametrize("first", [None, 100, 50, 101])
def test_first_step_at_or_below_the_plan_is_the_growth_step(first):
    r = search.search_max_batch(threshold(117), 100, first=first)
    assert r.tries[1][0] == (101 if first == 101 else 125) and r.real_max == 117


def test_first_step_is_ignored_when_the_plan_fails():
    r = search.search_max_batch(threshold(60), 100, first=130)
    assert 130 not in [b for b, _, _ in r.tries] and r.real_max == 60


def test_errors_are_recorded_as_given():
    msgs = iter([(True, "ok"), (False, "ValueError: something else"), (True, "ok")])
    r = search.search_max_batch(lambda b: next(msgs), 4, max_tries=3)
    assert r.tries[1] == (5, False, "ValueError: something else")


def test_bad_arguments():
    for kwargs in ({"planned": 0}, {"planned": 3, "max_tries": 0}, {"planned": 3, "width": 0}):
        with pytest.raises(ValueError):
            search.search_max_batch(threshold(3), **kwargs)


@given(st.integers(1, 50_000), st.integers(0, 60_000))
def test_any_threshold_is_found_within_the_cap(planned, t):
    r = search.search_max_batch(threshold(t), planned, max_tries=64)
    assert r.real_max == t and not r.cap_hit
    check_consistent(r, t)
    # a threshold below the first growth step costs the plan, that step and a bisection of the gap between them
    step = max(planned + 1, int(planned * search.GROWTH))
    if planned <= t < step:
        assert len(r.tries) <= 2 + math.ceil(math.log2(step - planned))


# The search, several candidates side by side ----------------------------------------------------------------
@pytest.mark.parametrize("width", [2, 3, 4, 6])
@pytest.mark.parametrize("planned, t, first", [(100, 117, 128), (100, 117, None), (3891, 4033, 4133),
                                               (6837, 7360, 7435), (434, 444, 462), (100, 60, 130), (100, 1000, 120),
                                               (100, 0, 130), (5, 5, 6)])  # fmt: skip
def test_side_by_side_rounds_find_the_same_batch(width, planned, t, first):
    rounds = []

    def fits_many(bs):
        rounds.append(list(bs))
        assert len(bs) <= width
        return [(True, "ok") if b <= t else (False, OOM) for b in bs]

    r = search.search_max_batch(None, planned, first=first, width=width, fits_many=fits_many, max_tries=64)
    assert r.real_max == t and not r.cap_hit
    check_consistent(r, t)
    one = search.search_max_batch(threshold(t), planned, first=first, max_tries=64)
    assert len(rounds) <= len(one.tries)  # never more rounds than the one-at-a-time search has tries
    assert rounds[0] == [planned] + ([first] if first and first > planned else [])


@given(st.integers(1, 20_000), st.integers(0, 30_000), st.integers(2, 8), st.integers(0, 3_000))
def test_side_by_side_any_threshold(planned, t, width, ahead):
    def fits_many(bs):
        return [(b <= t, "ok" if b <= t else OOM) for b in bs]

    r = search.search_max_batch(None, planned, first=planned + ahead, width=width, fits_many=fits_many, max_tries=200)
    assert r.real_max == t and not r.cap_hit
    check_consistent(r, t)


def test_side_by_side_rounds_are_fewer():
    rounds = []

    def fits_many(bs):
        rounds.append(bs)
        return [(b <= 4033, "ok" if b <= 4033 else OOM) for b in bs]

    r = search.search_max_batch(None, 3891, first=4133, width=6, fits_many=fits_many)
    assert r.real_max == 4033 and len(rounds) == 4  # vs 10 tries one at a time
    assert rounds[1] == [3925, 3960, 3994, 4029, 4063, 4098]  # the gap (3891, 4133) split in 7


def test_side_by_side_cap():
    r = search.search_max_batch(None, 100, first=128, width=4, max_tries=5,
                            fits_many=lambda bs: [(b <= 117, "") for b in bs])  # fmt: skip
    assert len(r.tries) == 5 and r.cap_hit
    lo, hi = r.real_max
    assert lo <= 117 < hi


@pytest.mark.parametrize("requested, budget, card, width", [(1, 21.6e9, 150e9, 1), (4, 21.6e9, 150e9, 4),
                                                            (8, 21.6e9, 150e9, 6), (8, 21.6e9, 85.5e9, 3),
                                                            (4, 135e9, 150e9, 1), (0, 21.6e9, 150e9, 1)])  # fmt: skip
def test_parallel_width(requested, budget, card, width):
    assert memory.parallel_width(requested, budget, int(card)) == width


# The small-card emulation -----------------------------------------------------------------------------------
def test_ballast_is_the_outside_pool_bytes_when_the_cap_is_exact():
    assert memory.ballast_bytes(bytes_limit=21_600_000_000, budget=21_600_000_000, outside=663_000_000) == 663_000_000


def test_ballast_corrects_the_caps_rounding():
    # the pool came out 4 MB above the budget: those 4 MB are not on the real card either
    assert memory.ballast_bytes(21_604_000_000, 21_600_000_000, 663_000_000) == 667_000_000
    # 4 MB below: the pool already lacks them
    assert memory.ballast_bytes(21_596_000_000, 21_600_000_000, 663_000_000) == 659_000_000
    assert memory.ballast_bytes(21_596_000_000, 21_600_000_000, 0) == 0  # never negative


def test_ballast_leaves_the_real_cards_pool():
    limit, budget, outside = 21_612_345_678, 21_600_000_000, 666_123_456
    assert limit - memory.ballast_bytes(limit, budget, outside) == budget - outside
    # the H200 run: pool 21,508,390,912 B for a 21.6 GB budget, 0.616 GiB outside it
    assert memory.ballast_bytes(21_508_390_912, 21_600_000_000, 661_651_456) == 570_042_368


@pytest.mark.parametrize("nbytes", [0, 1, 2**30 - 1, 2**30, 2**30 + 1, 5 * 2**30 + 17, -3])
def test_ballast_chunks(nbytes):
    chunks = memory.ballast_chunks(nbytes)
    assert sum(chunks) == max(0, nbytes)
    assert all(0 < c <= memory.BALLAST_CHUNK for c in chunks)
    assert memory.ballast_chunks(10, chunk=4) == [4, 4, 2]


def test_is_oom():
    assert search.is_oom(OOM)
    assert search.is_oom("JaxRuntimeError: Out of memory allocating 77 bytes")
    assert search.is_oom("JaxRuntimeError: NOT_FOUND: All configs failed during profiling or were excluded from "
                     "selection.\nFailures (23):\nEXECUTION FAILED: RESOURCE_EXHAUSTED: Out of memory")  # fmt: skip
    assert not search.is_oom("AssertionError: more rows than slots")


# What the plan promises and what one sequence costs ---------------------------------------------------------
@pytest.mark.parametrize("model, kv", [("gpt2", "bfloat16"), ("gpt2", "int8"), ("gpt2-xl", "bfloat16"),
                                       ("gpt2-xl", "int8")])  # fmt: skip
def test_plan_activation_matches_the_plan(model, kv):
    p = plan(model, kv)
    assert memory.plan_activation(p, p.max_num_seqs) == p.activation_bytes
    assert memory.short_blocks(p) == (128, 8)


def test_seq_cost_gpt2_bf16():
    p = plan()
    cost = memory.seq_cost(p)
    assert cost["kv"] == 8 * 16 * 36_864  # 8 blocks of 16 tokens at 36,864 B per token
    # the lm-head's autotuning sets gpt2's workspace at its max batch: one more row is one float32 logits row of
    # the GEMM's output and one bfloat16 row of its input
    e, vocab = 768, 50_257
    row = vocab * 4 + e * 2
    assert cost["workspace"] == row
    assert cost["total"] == cost["kv"] + row


@pytest.mark.parametrize("model, kv", [("gpt2", "bfloat16"), ("gpt2", "int8"), ("gpt2-xl", "bfloat16")])
def test_formula_max_batch_brackets_the_plan(model, kv):
    p = plan(model, kv)
    b = memory.formula_max_batch(p)
    assert b >= p.max_num_seqs  # the plan never promises more than its own arithmetic allows
    _, per = memory.short_blocks(p)

    def peak(n: int) -> int:
        return p.param_bytes + p.reserve_bytes + (n * per + 1) * p.layout.bytes_per_block + memory.plan_activation(p, n)

    assert peak(b) <= p.budget_bytes < peak(b + 1)


@pytest.mark.parametrize("model, kv, formula", [("gpt2", "bfloat16", 4176), ("gpt2-xl", "bfloat16", 443)])
def test_first_step_of_the_plans(model, kv, formula):
    """One sequence above the plan's own arithmetic: a calibrated plan is proved exact when it fails."""
    p = plan(model, kv)
    assert memory.formula_max_batch(p) == formula == p.max_num_seqs
    assert memory.first_step(p, formula) == formula + 1


def test_batch_report_exact_and_bounds():
    cost = {"kv": 100, "workspace": 10, "total": 110}
    exact = search.search_max_batch(threshold(117), 100)
    rep = search.batch_report(exact, 100, cost)
    assert (rep["real"], rep["bounds"], rep["diff_seqs"], rep["diff_bytes"]) == (117, [117, 118], 17, 17 * 110)
    assert rep["diff_pct"] == pytest.approx(17.0) and rep["plan_fit"] and not rep["cap_hit"]
    assert rep["tries"][0] == {"batch": 100, "ok": True, "error": None, "oom": None}
    assert rep["tries"][1] == {"batch": 125, "ok": False, "error": OOM, "oom": True}
    assert rep["non_oom_failures"] == 0
    capped = search.batch_report(search.search_max_batch(threshold(117), 100, max_tries=5), 100, cost)
    assert (capped["real"], capped["bounds"], capped["diff_seqs"], capped["cap_hit"]) == (None, [115, 118], 15, True)
    over = search.batch_report(search.search_max_batch(threshold(90), 100), 100, cost)
    assert (over["real"], over["diff_seqs"], over["plan_fit"]) == (90, -10, False)
    assert over["diff_pct"] == pytest.approx(-10.0)
    assert search.batch_cell(rep) == "117" and search.batch_cell(capped) == "[115, 118)"
    assert search.batch_cell({"real": None, "bounds": [2000, None]}) == "[2,000, ?)"


# The steps a probe runs -------------------------------------------------------------------------------------
class _FakeProbe(StepProbe):
    """A StepProbe of no engine: a pool of `num_blocks`, steps that record their inputs and run nothing."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        self._num_blocks, self._block_size, self.calls = num_blocks, block_size, []

    block_size = property(lambda self: self._block_size)
    num_blocks = property(lambda self: self._num_blocks)

    def run(self, x, *, decode=None, greedy=True):
        self.calls.append((x, decode, greedy))
        b = x.tokens.shape[0]
        return np.zeros(b, np.int32), np.zeros((b, 4), np.float32)


def test_search_decode_rows_are_exactly_b_on_their_own_blocks():
    b, per = 37, 8
    probe = _FakeProbe(b * per + 1)
    memory.run_step(probe, b, 128, 1)
    x, decode, greedy = probe.calls[0]
    assert decode and not greedy  # the sampling path: its sort is the widest workspace
    assert x.tokens.shape == (b, 1) and x.block_tables.shape == (b, 8)  # exactly B rows, no bucketing
    tables = x.block_tables.tolist()
    used = [blk for row in tables for blk in row]
    assert sorted(used) == list(range(1, b * per + 1))  # every usable block once: rows share none, null block unused
    assert x.context_lens.tolist() == [127] * b and x.positions[:, 0].tolist() == [127] * b  # 128 tokens with this one
    assert x.slot_blocks[:, 0].tolist() == [row[7] for row in tables]  # the new token goes to the row's last block


def test_search_prefill_is_the_plans_chunk():
    p = plan()
    # the 2,048 padded positions of a 2,048-token budget, as two rows of gpt2's 1,024 (a step the scheduler makes:
    # a 1,024-token chunk and any other chunk pad to [2, 1,024])
    assert memory.prefill_step(p) == (2, 1024, 1024)
    probe = _FakeProbe(3891 * 8 + 1)
    memory.run_step(probe, *memory.prefill_step(p))
    x, decode, _ = probe.calls[0]
    assert not decode and x.tokens.shape == (2, 1024) and x.query_lens.tolist() == [1024, 1024]


# The parent's side of the search ----------------------------------------------------------------------------
def fake_probes(t: int, crash_at: int | None = None):
    """A stand-in for the side-by-side child runs: candidates up to t fit; the crash_at-th probe dies; each probe
    alone on the card reports an outside-pool footprint of 700 + its number."""
    calls = []

    def run_probes(jobs, env, log_files):
        out = []
        for target, kw in jobs:
            assert target == "jkv.bench.memory:try_batch"
            assert (kw["model_name"], kw["kv"], kw["hbm"], kw["utilization"]) == ("gpt2", "bfloat16", 24 * 10**9, 0.9)
            assert env == {"X": "1"} and len(log_files) == len(jobs)
            b, outside, alone = kw["batch"], kw["outside"], kw["alone"]
            assert alone == (len(jobs) == 1)
            calls.append((b, outside))
            if len(calls) == crash_at:
                out.append((None, "Fatal Python error: Segmentation fault\n"))  # a crash: the candidate does not fit
                continue
            ok = b <= t
            res = {"batch": b, "ok": ok, "error": None if ok else OOM, "outside": 700 + len(calls) if alone else None}
            out.append((res, ""))
        return out

    run_probes.calls = calls
    return run_probes


def test_search_row_runs_one_probe_process_per_candidate(capsys):
    """One `try_batch` child per candidate, each told the largest outside-pool footprint seen so far; a child that
    dies counts as not fitting."""
    p = plan()
    t = p.max_num_seqs + 40
    fake = fake_probes(t, crash_at=4)
    mb = memory.search_row("gpt2", "bfloat16", 24 * 10**9, 0.9, 650, 24, {"X": "1"}, None, run=fake)
    calls = fake.calls
    assert calls[0] == (p.max_num_seqs, 650)  # the plan's steps' footprint first
    assert calls[1][0] == mb["first_step"] == memory.first_step(p, memory.formula_max_batch(p))
    assert [o for _, o in calls[1:]] == [701, 702, 703, 703] + [700 + i for i in range(5, len(calls))]
    crashed = mb["tries"][3]
    assert not crashed["ok"] and crashed["error"].startswith("probe died: Fatal Python error") and not crashed["oom"]
    assert mb["non_oom_failures"] == 1
    assert mb["real"] == (t if calls[3][0] > t else calls[3][0] - 1)
    assert mb["formula"] == memory.formula_max_batch(p) and mb["blocks_per_seq"] == 8 and mb["outside_start"] == 650
    assert mb["outside_max"] == 700 + len(calls) and mb["width"] == 1
    assert all("wall_seconds" in row for row in mb["tries"])
    assert f"B={p.max_num_seqs} ({p.max_num_seqs * 8 + 1} blocks): fits" in capsys.readouterr().out


def test_search_row_side_by_side():
    p = plan()
    t = p.max_num_seqs + 123
    fake = fake_probes(t)
    mb = memory.search_row("gpt2", "bfloat16", 24 * 10**9, 0.9, 650, 24, {"X": "1"}, None, width=4, run=fake)
    assert mb["real"] == t and mb["width"] == 4
    assert fake.calls[:2] == [(p.max_num_seqs, 650), (mb["first_step"], 650)]  # shared rounds measure no footprint
    assert mb["tries"][0]["outside"] is None and mb["tries"][1]["outside"] is None
    # a round of one candidate (a gap of 2 at the end) runs it alone, which measures its footprint
    assert mb["outside_max"] == max([650] + [row["outside"] for row in mb["tries"] if row["outside"] is not None])


def test_help_runs():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "measure_memory.py"), "--help"], capture_output=True,
                       text=True, check=False)  # fmt: skip
    assert r.returncode == 0 and "--max-tries" in r.stdout and "--parallel" in r.stdout


def test_run_probes_side_by_side_keeps_each_stderr(tmp_path):
    """Two real children at once; neither can run here (no GPU, no such model), so each returns no RESULT and its
    own stderr, also kept in full in its log file."""
    job = ("jkv.bench.memory:try_batch", {"model_name": "no-such-model", "kv": "bfloat16", "hbm": 24 * 10**9,
                                          "utilization": 0.9, "batch": 8, "outside": 0, "alone": False})  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs = harness.run_side_by_side([job, job], env, [tmp_path / "a.log", None])
    assert [run.result for run in runs] == [None, None]
    assert all("Traceback" in run.stderr and run.returncode != 0 for run in runs)
    assert "Traceback" in (tmp_path / "a.log").read_text()


def test_plan_with_a_measured_reserve_matches_plan_cli_and_never_exceeds_the_budget():
    """The calibrated plan (measure_memory's summary) is what `plan.py --reserve` says, and it holds more
    sequences, at most as many as the smaller reserve frees (a sequence costs at least its KV blocks)."""
    import json

    from kvspec.layout import kv_bytes_per_token, kv_dtype

    hbm, reserve = 24 * 10**9, int(0.5 * 2**30)
    got = memory.plan_with_reserve("gpt2", "bfloat16", hbm, 0.9, reserve)
    cli = subprocess.run([sys.executable, "scripts/plan.py", "--hbm", "24GB", "--model", "gpt2", "--kv-dtype",
                          "bfloat16", "--reserve", str(reserve), "--json"], capture_output=True, text=True,
                         check=True, cwd=ROOT)  # fmt: skip
    assert json.loads(cli.stdout)["max_num_seqs"] == got
    default = make_plan(load_config("gpt2"), PlanOptions(hbm_bytes=hbm, kv_dtype="bfloat16")).max_num_seqs
    freed = make_plan(load_config("gpt2"), PlanOptions(hbm_bytes=hbm)).reserve_bytes - reserve
    per_seq_kv = 128 * kv_bytes_per_token(load_config("gpt2"), kv_dtype("bfloat16"))  # shortest listed length
    assert default < got <= default + freed // per_seq_kv + 1
    plan = make_plan(load_config("gpt2"), PlanOptions(hbm_bytes=hbm, kv_dtype="bfloat16", reserve_bytes=reserve))
    assert plan.peak_bytes <= plan.budget_bytes


def test_planned_stages_run_the_multi_step_call_at_the_planned_batch():
    """The plan's stages end with jkv.generate's multi-step decode at the planned batch (CPU: the tiny fixture
    model, a fake device that reports a growing peak); a failing call is reported as that stage's failure."""
    import jkv

    fixture = ROOT / "tests" / "fixtures" / "hf_tiny_gpt2"
    from planner.memory import AUTOTUNE_FLOOR_BYTES

    hbm = int((AUTOTUNE_FLOOR_BYTES + 3 * 10**6) / 0.9)  # ~3 MB of KV pool above the workspace's floor
    plan = make_plan(load_config(str(fixture)), PlanOptions(hbm_bytes=hbm, dtype="float32", reserve_bytes=0,
                                                            prefill_chunk=64))  # fmt: skip
    model = jkv.load_model(fixture, dtype="float32")
    eng = jkv.Engine(model, num_blocks=plan.layout.num_blocks, max_num_seqs=plan.max_num_seqs,
                     max_num_batched_tokens=plan.workspaces[0].tokens)  # fmt: skip
    peaks = iter(range(1, 100))
    dev = SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": next(peaks)})
    probe = StepProbe(eng)
    stages, failed = memory.planned_stages(probe, plan, dev)
    assert failed is None
    assert stages["decode_steps_max_batch"] > stages["decode_max_len"] > 0  # ran, after the single steps
    assert stages["compiled_decode_steps_max_batch"] > 0
    x = memory.step_inputs(probe, plan.max_num_seqs, 40, 1, 8)
    assert x.tokens.shape[0] == plan.max_num_seqs and (x.query_lens == 8).all()
    assert (x.block_tables[:, : -(-47 // eng.block_size)] >= 1).all()  # every step's slot is a real block

    def broken(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    probe.run_decode_steps = broken  # the probe's multi-step call fails (the engine is left as it is)
    _, failed = memory.planned_stages(probe, plan, dev)
    assert failed.startswith("decode_steps_max_batch: RuntimeError: RESOURCE_EXHAUSTED")


def test_calibrated_plan_adds_the_allowance_to_the_measured_reserve():
    """measure_memory's closing table plans with the measured outside-pool bytes plus the planner's allowance:
    with the default line's own outside bytes it gives the default plan."""
    from planner.memory import RESERVE_ALLOWANCE_BYTES, runtime_reserve

    cfg = load_config("gpt2")
    outside = runtime_reserve(cfg) - RESERVE_ALLOWANCE_BYTES
    assert memory.measured_reserve(outside) == runtime_reserve(cfg)
    default = plan().max_num_seqs
    row = {"model": "gpt2", "kv_dtype": "bfloat16", "hbm": 24 * 10**9, "budget": "24GB",
           "measured": {"reserve": outside}, "max_batch": {"real": default + 1}}  # fmt: skip
    [(same, reserve, planned, above)] = memory.calibrate([row], 0.9)
    assert same is row and reserve == runtime_reserve(cfg) and planned == default
    assert row["max_batch"]["planned_with_measured_reserve"] == default
    assert not above  # measure_memory.py prints "ABOVE THE REAL MAXIMUM" for these
    row["max_batch"]["real"] = default - 1
    [(_, _, _, above)] = memory.calibrate([row], 0.9)
    assert above


def test_calibrated_plan_of_a_search_only_row_uses_the_given_outside_bytes():
    """A row searched with `measure_memory.py --outside` has no measured terms: the calibrated plan takes the
    outside-pool bytes it was given, and a larger footprint plans fewer sequences."""
    from planner.memory import RESERVE_ALLOWANCE_BYTES, runtime_reserve

    cfg = load_config("gpt2")
    default = plan().max_num_seqs
    row = {"model": "gpt2", "kv_dtype": "bfloat16", "hbm": 24 * 10**9, "budget": "24GB",
           "outside_given": runtime_reserve(cfg) - RESERVE_ALLOWANCE_BYTES, "max_batch": {"real": default}}  # fmt: skip
    [(_, reserve, planned, above)] = memory.calibrate([row], 0.9)
    assert reserve == runtime_reserve(cfg) and planned == default and not above
    row["outside_given"] += 64 * 2**20
    [(_, _, larger, _)] = memory.calibrate([row], 0.9)
    assert larger < default
