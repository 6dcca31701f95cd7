"""A prefill step's padded size stays within the planner's prefill term.

The engine pads a prefill step to [rows, chunk] powers of two. One long chunk beside many one-token chunks used to
make a step of rows x longest positions (up to max_num_seqs x budget), far beyond the `padded_prefill_tokens(budget)`
positions the planner sizes the workspace for; the scheduler now cuts chunks short or leaves rows to the next round.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import jkv
from jkv.reference import reference_generate
from kvspec.shapes import ShapePolicy
from planner import PlanOptions, load_config, make_plan
from planner.memory import padded_prefill_tokens

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"


@pytest.fixture(scope="module")
def model():
    return jkv.load_model(FIXTURE, dtype="float32")


def burst(model, seed: int) -> list[tuple[list[int], int]]:
    """A long prompt first, then many one- and two-token prompts, all arriving together."""
    rng = np.random.default_rng(seed)
    lengths = [60] + [int(rng.integers(1, 3)) for _ in range(14)] + [33, 5]
    return [(rng.integers(0, model.config.vocab_size, n).tolist(), int(rng.integers(2, 6))) for n in lengths]


def reference(model, reqs) -> list[list[int]]:
    """The dense reference's greedy tokens per (prompt, max_tokens), in one batch (one compilation for all):
    each request's first max_tokens of the longest output."""
    out = reference_generate(model, [p for p, _ in reqs], max_tokens=max(n for _, n in reqs))
    return [tokens[:n] for tokens, (_, n) in zip(out, reqs)]


def run_recording(eng, reqs):
    """Serve reqs (all queued at once); the (rows, chunk) of every prefill call and the greedy tokens."""
    runner = eng.executor.runner
    shapes, real = [], runner.run_step

    def spy(pools, x, prev, *, decode, greedy):
        if not decode:
            shapes.append(x.tokens.shape)
        return real(pools, x, prev, decode=decode, greedy=greedy)

    runner.run_step = spy
    ids = [eng.add_request(p, jkv.SamplingParams(max_tokens=n)) for p, n in reqs]
    final = eng.run()
    return shapes, [final[i].token_ids for i in ids]


@pytest.mark.parametrize("budget", [64, 100])
def test_prefill_steps_stay_within_the_planned_positions(model, budget):
    eng = jkv.Engine(model, num_blocks=200, block_size=8, max_num_seqs=16, max_num_batched_tokens=budget,
                     attention="reference")  # fmt: skip
    cap = padded_prefill_tokens(budget)
    assert eng.shapes.max_prefill_positions == eng.scheduler.shapes.max_prefill_positions == cap
    reqs = burst(model, seed=budget)
    shapes, tokens = run_recording(eng, reqs)
    assert shapes and all(rows * chunk <= cap for rows, chunk in shapes), shapes
    assert max(rows for rows, _ in shapes) > 1  # short prompts still share prefill steps
    assert tokens == reference(model, reqs)


class Uncapped(ShapePolicy):
    """The engine's shape policy without the bound on a prefill step's padded size."""

    @property
    def max_prefill_positions(self) -> int:
        return 2**62


def test_without_the_cap_the_burst_pads_far_beyond_it(model):
    # the same burst through a scheduler without the padding rule: the first round's step is much larger
    eng = jkv.Engine(model, num_blocks=200, block_size=8, max_num_seqs=16, max_num_batched_tokens=64,
                     attention="reference")  # fmt: skip
    eng.scheduler.shapes = Uncapped(**{f.name: getattr(eng.shapes, f.name) for f in dataclasses.fields(eng.shapes)})
    shapes, _ = run_recording(eng, burst(model, seed=64))
    assert max(rows * chunk for rows, chunk in shapes) >= 4 * padded_prefill_tokens(64)


def test_a_chunk_is_cut_to_fit_rather_than_dropped(model):
    # budget 128: after 7 one-token rows, a 40-token prompt joins as the 8th row with a chunk of 16 tokens
    # (8 rows x 16 = 128 positions; 8 x 32 would not fit); its prefill continues in the next round
    eng = jkv.Engine(model, num_blocks=200, block_size=8, max_num_seqs=16, max_num_batched_tokens=128,
                     attention="reference")  # fmt: skip
    rng = np.random.default_rng(5)
    reqs = [([int(t)], 3) for t in rng.integers(0, 100, 7)] + [(rng.integers(0, 100, 40).tolist(), 3)]
    runner = eng.executor.runner
    lens, real = [], runner.run_step

    def spy(pools, x, prev, *, decode, greedy):
        if not decode:
            lens.append([int(n) for n in x.query_lens if n])
        return real(pools, x, prev, decode=decode, greedy=greedy)

    runner.run_step = spy
    ids = [eng.add_request(p, jkv.SamplingParams(max_tokens=n)) for p, n in reqs]
    final = eng.run()
    assert lens[0] == [1] * 7 + [16]
    assert lens[1][0] == 24  # the rest of the long prompt, first in the next round
    assert [final[i].token_ids for i in ids] == reference(model, reqs)


def test_plan_prefill_term_is_the_padded_positions():
    cfg = load_config("gpt2")
    for chunk, want in [(512, 512), (1000, 1024), (2048, 2048), (5, 16)]:
        plan = make_plan(cfg, PlanOptions(hbm_bytes=24 * 10**9, prefill_chunk=chunk, max_num_seqs=32))
        assert plan.workspaces[0].name == "prefill" and plan.workspaces[0].tokens == want
