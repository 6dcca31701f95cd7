#!/usr/bin/env python
"""Plan vs measured GPU memory, term by term, and the real maximum decode batch; a fresh process per measurement.

    python scripts/measure_memory.py [--models gpt2,gpt2-xl] [--kv-dtypes bfloat16,int8] [--budgets 24GB,full]
        [--max-tries 24] [--parallel 1] [--out rows.json] [--logs DIR]

For each (model, KV dtype, budget) a child process caps JAX's allocator at the plan's budget
(XLA_PYTHON_CLIENT_MEM_FRACTION = hbm * utilization / card memory, preallocated as JAX does by default: one
region, so the allocator cannot fragment by growing; `full` = the whole card), builds the engine's
pools from the plan, and runs the largest steps the plan promises on the engine's own jitted step functions:
the plan's prefill step (its padded positions, in rows of up to max_seq_len tokens) and decode steps at the
planned maximum batch (at 128 tokens and at the maximum length), with the sampling path on (the sampler's sort
is the widest workspace). It reads `memory_stats()` after each stage and the card's used memory (nvidia-smi) at the end.

Measured terms: parameters = bytes_in_use after loading; KV pool = growth when the pools are allocated; activation =
peak_bytes_in_use - parameters - pool; outside JAX's pool = the process's device memory (nvidia-smi) - the
allocator's pool (CUDA context, loaded kernels, cuBLAS/cuDNN handles). Measured peak = peak_bytes_in_use +
outside-pool bytes: everything the process used on the card. (With a preallocated pool, nvidia-smi alone always
shows the cap, whatever the process really uses.) The measured activation reads above what the steps need: XLA's
GEMM autotuner takes free memory opportunistically while it compiles (an H200 run: +1,722 MiB with the card free for
a step that compiled and ran with 1,580 MiB free under the cap); `measure_workspace.py --free` measures the need,
and the real-maximum search below is the test that counts.

Real maximum batch. The plan's maximum batch (`plan.max_num_seqs`) is the largest decode batch B whose own step
workspace still leaves room for a KV pool of B sequences at the shortest listed length (`per_short` blocks each,
plus the null block). The search measures exactly that. A candidate B runs in a fresh process under the same cap: an
engine of exactly B * per_short + 1 blocks and max_num_seqs=B, a decode step of B rows (exactly B, not bucketed: the
engine pads to min(bucket(rows), max_num_seqs)) at the shortest length with sampling on, each row on its own blocks,
then the plan's prefill step. B fits when both compile and run; any exception counts as not fitting and is recorded
(type and first 200 characters; `oom` says whether it reads as running out of memory). Starting at the plan's B
(which must fit), the next candidate is `first_step` (one sequence above the plan's own arithmetic: the plan is
calibrated to the card, so this failing proves it exact), then B gallops up from the plan (B + 2, B + 4, B + 8, ...,
each step at most 1 %, ROW_GROWTH) until a candidate fails, then bisects to the exact largest B that fits; if the
plan's B does not fit (the plan over-promised), it gallops down (B - 1, B - 2, B - 4, ...) to a fit and bisects. A
candidate far above the threshold is slow to fail (the allocator waits on every allocation it refuses, and XLA's
autotuner tries dozens: gpt2-xl at 1.25x the plan took 185 s on an H200), hence the small steps. At most --max-tries
candidates; the bounds are reported if the cap comes first. --parallel N runs up to N candidates side by side per
round (as many as the card holds at the budget; N=1, the default, is the rule above): the plan with the first step,
then N growth steps, then N points splitting the gap. `formula` is the largest B the plan's own arithmetic allows,
computed here independently of make_plan's solve as a cross-check (they agree since the solve bisects; before that
it settled below: 3,891 vs 3,924 for gpt2 at 24 GB), so real - planned is the memory model's margin alone.

Why a process per candidate: a step that runs out of memory mid-execution leaves its buffers allocated inside
XLA (on an H200, bytes_in_use stayed a logits buffer higher after gc and jax.clear_caches), and XLA's autotuner
keeps its results for the process, so a candidate after a failure, or one whose shapes were compiled earlier
under more free memory, is not what a real engine meets at start-up. A fresh process compiles cold under exactly
the candidate's pools, as an engine on the real card does (compile-time autotuning scratch included).

Emulating a smaller card faithfully. On a real card of `hbm` bytes the process's whole footprint, JAX's pool plus
the memory outside it (CUDA context, loaded kernels, library handles), must fit the plan's budget (hbm *
utilization). Here JAX's pool alone is capped at the budget and the outside memory comes on top of it, so the pool
would give a candidate `outside` bytes a real card would not. Each candidate's process therefore first allocates a
"ballast" array inside JAX's pool of bytes_limit - (budget - outside) bytes (the outside-pool bytes, corrected by
the cap's rounding) and keeps it alive, so the usable pool is what the real card leaves JAX. `outside` is the
largest outside-pool footprint seen so far in the row: measured after the plan's steps, then by every candidate
that ran alone on the card, after its steps (each candidate's own kernels load outside the pool).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROWTH = 1.25  # search_max_batch's default step above the last fit while no candidate has failed yet
ROW_GROWTH = 1.01  # the real-max search's step: calibrated plans are within a few sequences of the threshold
MAX_TRIES = 24  # candidates per row: a fresh process each, 15-30 s on an H200 (gpt2 / gpt2-xl)
BALLAST_CHUNK = 2**30  # bytes per ballast array (keeps each well inside int32 indexing)
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


class BatchSearch(NamedTuple):
    """What the search found: `real_max` is exact (int) or, when the cap was hit first, the bounds (largest B that
    fit, 0 if none; smallest B that failed, None if none did); `tries` is every (B, fitted, message) in order."""

    real_max: int | tuple[int, int | None]
    tries: list[tuple[int, bool, str]]
    cap_hit: bool

    @property
    def bounds(self) -> tuple[int, int | None]:
        """(largest B that fit, smallest B that failed); exact results give (real_max, real_max + 1)."""
        return self.real_max if isinstance(self.real_max, tuple) else (self.real_max, self.real_max + 1)


def search_max_batch(
    fits: Callable[[int], tuple[bool, str]],
    planned: int,
    *,
    first: int | None = None,
    growth: float = GROWTH,
    max_tries: int = MAX_TRIES,
    width: int = 1,
    fits_many: Callable[[list[int]], list[tuple[bool, str]]] | None = None,
    gallop_down: bool = False,
    gallop_up: bool = False,
) -> BatchSearch:
    """The largest decode batch B with fits(B) true, found from the plan's B with as few candidates as the rule allows.

    If the planned B fits, the next candidate is `first` (when it is above the plan; else the growth step), then B
    grows by `growth` (at least +1) until a candidate fails; then it bisects between the last fit and the first
    failure down to a gap of 1. If the planned B fails, it bisects between 0 and it. Assumes fits is monotone
    (fits for B means fits for every smaller B); never tries a B twice; stops after max_tries candidates.

    width > 1 tries up to `width` candidates per round through fits_many (default: fits on each in turn): the plan
    with `first`, then `width` growth steps, then `width` points splitting the gap evenly. width=1 is the rule above.

    gallop_down: when the planned B fails, try B - 1, B - 2, B - 4, ... until one fits, then bisect (a calibrated
    plan that over-promises does so by a few sequences, so this costs a few tries where halving from 0 costs ~log B).

    gallop_up: when the plan fits, grow from it by doubling offsets (B + 2, B + 4, B + 8, ...), each step at most
    the growth step, then bisect: a calibrated plan is a few sequences under the real maximum, so a failure comes
    within a few tries and leaves a gap of a few sequences to split, where 1 % steps leave ~1 % to split.
    """
    if planned < 1 or max_tries < 1 or width < 1:
        raise ValueError(f"planned={planned}, max_tries={max_tries} and width={width} must be at least 1.")
    fits_many = fits_many or (lambda bs: [fits(b) for b in bs])
    tries: list[tuple[int, bool, str]] = []
    lo, hi = 0, None

    def round_of(bs: list[int]) -> None:
        nonlocal lo, hi
        bs = bs[: max_tries - len(tries)]
        results = fits_many(bs)
        tries.extend((b, bool(ok), msg) for b, (ok, msg) in zip(bs, results, strict=True))
        failed = [b for b, (ok, _) in zip(bs, results, strict=True) if not ok]
        hi = min([*failed, *([] if hi is None else [hi])], default=None)
        lo = max([lo, *(b for b, (ok, _) in zip(bs, results, strict=True) if ok and (hi is None or b < hi))])

    jump = first if first is not None and first > planned else None
    round_of([planned] + ([jump] if jump and width > 1 else []))
    if lo < planned:  # the plan over-promised: whatever else this round tried is above it too
        lo, hi = 0, min(hi, planned)
        k = 0
        while gallop_down and lo == 0 and hi > 1 and len(tries) < max_tries:
            steps = sorted({max(1, planned - 2**i) for i in range(k, k + width)}, reverse=True)
            k += width
            round_of([b for b in steps if b < hi])
    offset = 1  # gallop_up: the last offset from the plan tried
    while hi is None and len(tries) < max_tries:
        steps, b = [], lo
        for _ in range(width):
            if jump and jump not in [t[0] for t in tries] and jump > b:
                b = jump
            else:
                step = max(b + 1, int(b * growth))
                if gallop_up:
                    while planned + offset <= b:
                        offset *= 2
                    step = min(step, planned + offset)
                b = step
            steps.append(b)
        round_of(steps)
    while hi is not None and hi - lo > 1 and len(tries) < max_tries:
        round_of(sorted({lo + (hi - lo) * i // (width + 1) for i in range(1, width + 1)} - {lo}))
    exact = hi is not None and hi - lo == 1
    return BatchSearch(lo if exact else (lo, hi), tries, not exact)


def ballast_bytes(bytes_limit: int, budget: int, outside: int) -> int:
    """Bytes to hold in JAX's pool so that what is left of it is what a real card of `budget` bytes leaves JAX.

    A real card gives JAX budget - outside (the CUDA context and kernels take the rest); here the pool holds
    bytes_limit (the budget, up to the rounding of XLA_PYTHON_CLIENT_MEM_FRACTION) with `outside` on top.
    """
    return max(0, bytes_limit - (budget - outside))


def ballast_chunks(nbytes: int, chunk: int = BALLAST_CHUNK) -> list[int]:
    """Sizes of the uint8 arrays that hold `nbytes` of ballast, none above `chunk`."""
    return [min(chunk, nbytes - at) for at in range(0, max(0, nbytes), chunk)]


def is_oom(msg: str) -> bool:
    """Whether a recorded failure reads as running out of device memory (anything else is a bug, not a limit)."""
    return any(m in msg for m in OOM_MARKERS)


def parallel_width(requested: int, budget: float, card: int, margin: int = 2 * 2**30) -> int:
    """How many probes can run side by side: each holds its capped pool plus its memory outside it (`margin`)."""
    return max(1, min(requested, int(card // (budget + margin))))


def short_blocks(plan) -> tuple[int, int]:
    """(shortest listed length, blocks one sequence of it holds): what the planner prices max_num_seqs at."""
    from planner.plan import short_sequence

    return short_sequence(plan.config, plan.options, plan.max_seq_len)


def plan_activation(plan, batch: int) -> int:
    """The plan's activation term at decode batch `batch`, as make_plan sizes it (`step_workspaces`)."""
    from planner.plan import step_workspaces

    return max(w.total for w in step_workspaces(plan.config, plan.options, batch, plan.max_seq_len))


def seq_cost(plan) -> dict:
    """Bytes one more sequence costs the plan at its maximum batch: its KV blocks at the shortest length and the
    growth of the activation term by one row (that row's activations and float32 logits copies)."""
    _, per_short = short_blocks(plan)
    kv = per_short * plan.layout.bytes_per_block
    b = plan.max_num_seqs
    workspace = plan_activation(plan, b + 1) - plan_activation(plan, b)
    return {"kv": kv, "workspace": workspace, "total": kv + workspace}


def formula_max_batch(plan) -> int:
    """The largest B the plan's own arithmetic allows: B * per_short + 1 blocks, the activation term at B, the
    parameters and the reserve within the budget. An independent check of make_plan's solve (equal since the solve
    bisects; before, it settled below this: 3,891 vs 3,924 for gpt2 at 24 GB), so real - planned is the memory
    model's margin and not the solve's."""
    _, per_short = short_blocks(plan)
    fixed = plan.param_bytes + plan.reserve_bytes + plan.layout.bytes_per_block

    def fits(b: int) -> tuple[bool, str]:
        return fixed + b * per_short * plan.layout.bytes_per_block + plan_activation(plan, b) <= plan.budget_bytes, ""

    found = search_max_batch(fits, plan.max_num_seqs, max_tries=256)
    assert not found.cap_hit
    return found.real_max


def first_step(plan, formula: int) -> int:
    """The first candidate above the plan: one sequence more than the plan's own arithmetic allows (`formula`).
    The plan's terms are calibrated to the card (planner.memory), so this candidate failing proves the plan exact;
    the search then gallops up by doubling offsets, each step at most ROW_GROWTH (1 %), since a candidate far above
    the threshold is slow to fail (the allocator waits on each allocation it refuses, and XLA's autotuner tries
    dozens). On an H100 (2026-11-27) 1 % steps left gpt2's real maximum in [4,177, 4,187) after 6 tries."""
    return formula + 1


def batch_report(search: BatchSearch, planned: int, cost: dict) -> dict:
    """Planned vs real maximum batch: the gap in sequences, %, and bytes (gap x one sequence's cost)."""
    lo, hi = search.bounds
    real = search.real_max if not search.cap_hit else None
    gap = lo - planned if real is None else real - planned
    return {
        "planned": planned, "real": real, "bounds": [lo, hi], "cap_hit": search.cap_hit,
        "diff_seqs": gap, "diff_pct": 100 * gap / planned, "diff_bytes": gap * cost["total"],
        "seq_bytes": cost, "plan_fit": search.tries[0][1] if search.tries else None,
        "tries": [{"batch": b, "ok": ok, "error": None if ok else msg, "oom": None if ok else is_oom(msg)}
                  for b, ok, msg in search.tries],
        "non_oom_failures": sum(1 for _, ok, msg in search.tries if not ok and not is_oom(msg)),
    }  # fmt: skip


def gpu_used_bytes() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.split()[0]) * 2**20


def gpu_total_bytes() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.split()[0]) * 2**20


def log(msg: str) -> None:
    """A progress line the parent echoes while the child runs (stdout, prefixed)."""
    print(f"LOG [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_inputs(eng, rows: int, ctx: int, chunk: int, steps: int = 1):
    """Exactly `rows` rows (no bucketing) of `chunk` new tokens ending at `ctx` tokens, sampling on; with
    steps > 1, a multi-step decode call's inputs whose rows run `steps` steps from there. Row r takes blocks
    r * per + i (mod the usable blocks): distinct blocks per row whenever the pool has room for them all (a
    memory test: the K/V values do not matter)."""
    import dataclasses

    import numpy as np

    from jkv.runner import bucket, build_inputs

    bs, usable = eng.block_size, eng.pools.num_blocks - 1
    per = math.ceil((ctx + steps - 1) / bs)
    rows_in = [([1] * chunk, ctx - chunk, [1 + (r * per + i) % usable for i in range(per)], 1.0, 0, 0.9, r, 0)
               for r in range(rows)]  # fmt: skip
    x = build_inputs(rows_in, block_size=bs, chunk=chunk, width=bucket(per), batch=rows)
    return x if steps == 1 else dataclasses.replace(x, query_lens=np.full(rows, steps, np.int32))


def run_step(eng, rows: int, ctx: int, chunk: int) -> None:
    """One step of the engine's jitted function on `step_inputs`."""
    import jax

    toks, logits, eng.pools = eng.runner.run(eng.pools, step_inputs(eng, rows, ctx, chunk), decode=chunk == 1,
                                             greedy=False)  # fmt: skip
    jax.block_until_ready((toks, logits))


def run_multi_step(eng, rows: int, ctx: int, steps: int) -> None:
    """One multi-step decode call (`Engine(decode_steps=steps)`, `jkv.generate`'s default) at `rows` rows."""
    import jax

    x = step_inputs(eng, rows, ctx, 1, steps)
    toks, eng.pools, _ = eng.runner.run_decode_steps(eng.pools, x, eng.runner.zero_tokens(), num_steps=steps,
                                                     greedy=False)  # fmt: skip
    jax.block_until_ready(toks)


def compiled_analysis(eng, rows: int, ctx: int, chunk: int, steps: int | None = None) -> dict:
    """XLA's memory accounting of the compiled step on `step_inputs` (with `steps`, the multi-step call). Compiling
    it here is what runs XLA's GEMM autotuner for its shapes."""
    x = step_inputs(eng, rows, ctx, chunk, steps or 1)
    ma = eng.runner.lower(eng.pools, x, decode=chunk == 1, greedy=False, num_steps=steps).compile().memory_analysis()
    return {
        "temp": int(ma.temp_size_in_bytes), "output": int(ma.output_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes), "argument": int(ma.argument_size_in_bytes),
    }  # fmt: skip


def compiled_temp(eng, rows: int, ctx: int, chunk: int, steps: int | None = None) -> int:
    """Bytes XLA's compiled step (with `steps`, the multi-step call) needs beyond its arguments (temp + outputs
    not aliased to the donated pools)."""
    ma = compiled_analysis(eng, rows, ctx, chunk, steps)
    return ma["temp"] + ma["output"] - ma["alias"]


def prefill_step(plan) -> tuple[int, int, int]:
    """(rows, context, chunk) of the plan's largest prefill: its chunk in rows of up to max_seq_len tokens."""
    max_len, tokens = plan.max_seq_len, plan.workspaces[0].tokens
    return max(1, tokens // max_len), max_len, min(max_len, tokens)


def planned_stages(eng, plan, dev) -> tuple[dict, str | None]:
    """Compiled sizes and measured peaks of the plan's largest steps on the plan's own pools, then a multi-step
    decode call at the planned batch (`jkv.generate`'s default); the first failure."""
    from jkv.engine import GENERATE_DECODE_STEPS as DECODE_STEPS

    shortest = min(128, plan.max_seq_len)
    b_long = plan.max_batch(plan.max_seq_len)
    stages = {
        "compiled_prefill": compiled_temp(eng, *prefill_step(plan)),
        "compiled_decode_max_batch": compiled_temp(eng, plan.max_num_seqs, shortest, 1),
        "compiled_decode_256": compiled_temp(eng, min(256, plan.max_num_seqs), shortest, 1),  # (fewer if capped)
    }
    stages["compiled_decode_steps_max_batch"] = compiled_temp(eng, plan.max_num_seqs, shortest, 1, DECODE_STEPS)
    for name, args in (("prefill", prefill_step(plan)),
                       ("decode_max_batch", (plan.max_num_seqs, shortest, 1)),
                       ("decode_max_len", (b_long, plan.max_seq_len, 1))):  # fmt: skip
        try:
            run_step(eng, *args)
        except Exception as err:  # noqa: BLE001 - an OOM here means the plan over-promised
            return stages, f"{name}: {type(err).__name__}: {str(err)[:200]}"
        stages[name] = dev.memory_stats()["peak_bytes_in_use"]
    try:  # jkv.generate's multi-step decode at the planned batch: its loop must fit the same workspace
        run_multi_step(eng, plan.max_num_seqs, shortest, DECODE_STEPS)
    except Exception as err:  # noqa: BLE001
        return stages, f"decode_steps_max_batch: {type(err).__name__}: {str(err)[:200]}"
    stages["decode_steps_max_batch"] = dev.memory_stats()["peak_bytes_in_use"]
    return stages, None


def load_row(model_name: str, kv: str, hbm: int, utilization: float):
    """A child's start: (the card's used bytes before JAX, the device, the plan, the loaded bf16 model)."""
    import warnings

    warnings.filterwarnings("ignore")
    import jax

    import jkv
    from planner import PlanOptions, load_config, make_plan

    base = gpu_used_bytes()
    dev = jax.devices()[0]
    plan = make_plan(load_config(model_name), PlanOptions(hbm_bytes=hbm, kv_dtype=kv, utilization=utilization))
    model = jkv.load_model(model_name, dtype="bfloat16")
    jax.block_until_ready(model.params)
    return base, dev, plan, model


def outside_pool_bytes(base: int, stats: dict) -> int:
    """The process's device memory outside JAX's pool: nvidia-smi's growth since `base` minus the pool."""
    return gpu_used_bytes() - base - stats.get("pool_bytes", stats["bytes_limit"])


def probe(model_name: str, kv: str, hbm: int, utilization: float, batch: int, outside: int, alone: bool) -> dict:
    """One candidate of the real-max-batch search in a fresh process (module docstring): the ballast, an engine of
    batch * per_short + 1 blocks and max_num_seqs=batch, a decode step of `batch` rows at the shortest length, then
    the plan's prefill chunk. Any exception means the candidate does not fit. Its own outside-pool footprint is
    measured only when it is `alone` on the card (nvidia-smi counts every process)."""
    base, dev, plan, model = load_row(model_name, kv, hbm, utilization)  # first: it silences warnings
    import jax
    import jax.numpy as jnp

    import jkv

    limit = dev.memory_stats()["bytes_limit"]
    ballast = [jnp.zeros(n, jnp.uint8) for n in ballast_chunks(ballast_bytes(limit, plan.budget_bytes, outside))]
    jax.block_until_ready(ballast)
    in_use = dev.memory_stats()["bytes_in_use"]
    shortest, per_short = short_blocks(plan)
    t, pool, decode_peak = time.time(), None, None
    try:
        eng = jkv.Engine(model, num_blocks=batch * per_short + 1, kv_dtype=kv, max_num_seqs=batch, attention="auto",
                         max_num_batched_tokens=plan.workspaces[0].tokens)  # fmt: skip
        pool = dev.memory_stats()["bytes_in_use"] - in_use
        run_step(eng, batch, shortest, 1)  # decode first: a candidate that does not fit costs one compilation
        decode_peak = dev.memory_stats()["peak_bytes_in_use"]
        run_step(eng, *prefill_step(plan))
        ok, msg = True, None
    except Exception as err:  # noqa: BLE001 - RESOURCE_EXHAUSTED is the answer we are looking for
        ok, msg = False, f"{type(err).__name__}: {str(err)[:200]}"
    stats = dev.memory_stats()
    return {
        "batch": batch, "ok": ok, "error": msg, "seconds": round(time.time() - t, 1), "blocks": batch * per_short + 1,
        "ballast": sum(a.nbytes for a in ballast), "outside_given": outside, "in_use_before": in_use,
        "peak_in_use": stats["peak_bytes_in_use"], "bytes_limit": limit, "pool": pool, "decode_peak": decode_peak,
        "outside": outside_pool_bytes(base, stats) if alone else None,
    }  # fmt: skip


def child(model_name: str, kv: str, hbm: int, utilization: float) -> dict:
    """The plan's steps on the plan's own pools, term by term (module docstring)."""
    base, dev, plan, model = load_row(model_name, kv, hbm, utilization)  # first: it silences warnings
    import jax

    import jkv

    params = dev.memory_stats()["bytes_in_use"]
    eng = jkv.Engine(model, num_blocks=plan.layout.num_blocks, kv_dtype=kv, max_num_seqs=plan.max_num_seqs,
                     max_num_batched_tokens=plan.workspaces[0].tokens, attention="auto")  # fmt: skip
    jax.block_until_ready(eng.pools)
    pool = dev.memory_stats()["bytes_in_use"] - params
    log(f"{model_name} {kv}: the plan's steps (max batch {plan.max_num_seqs}, {plan.layout.num_blocks} blocks)")
    stages, failed = planned_stages(eng, plan, dev)
    stats = dev.memory_stats()
    peak = stats["peak_bytes_in_use"]
    outside = outside_pool_bytes(base, stats)
    return {
        "model": model_name, "kv_dtype": kv, "hbm": hbm, "bytes_limit": stats["bytes_limit"],
        "planned": {"params": plan.param_bytes, "kv_pool": plan.kv_pool_bytes, "activation": plan.activation_bytes,
                    "reserve": plan.reserve_bytes, "peak": plan.peak_bytes},
        "measured": {"params": params, "kv_pool": pool, "activation": peak - params - pool,
                     "reserve": outside, "peak": peak + outside, "peak_in_use": peak},
        "largest_free_block": stats.get("largest_free_block_bytes"),
        "stages": stages, "planned_max_batch": plan.max_num_seqs,
        "planned_batch_at_max_len": plan.max_batch(plan.max_seq_len),
        "failed": failed, "device": dev.device_kind, "jax": jax.__version__,
    }  # fmt: skip


def start_child(args: list[str], env: dict, script: str = __file__):
    """Start a child of `script` (default: this one; stdout piped, stderr to a temporary file)."""
    err = tempfile.TemporaryFile("w+")  # noqa: SIM115 - finish_child closes it
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    return proc, err


def finish_child(proc, err, log_file: Path | None = None) -> tuple[dict | None, str]:
    """Wait for a child, echoing its LOG lines as they come; (its RESULT, the tail of its stderr). log_file keeps
    all of its stderr (XLA's own messages: allocator dumps, autotuning failures)."""
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        elif line.startswith("LOG "):
            print("  " + line[4:], end="", flush=True)
    proc.wait()
    err.seek(0)
    text = err.read()
    err.close()
    if log_file is not None:
        log_file.write_text(text)
    return result, text[-3000:]


def run_child(args: list[str], env: dict, log_file: Path | None = None) -> tuple[dict | None, str]:
    return finish_child(*start_child(args, env), log_file)


def run_probes(arg_lists: list[list[str]], env: dict, log_files: list[Path | None]) -> list[tuple[dict | None, str]]:
    """Run children side by side (each preallocates its own capped pool) and wait for all of them."""
    started = [start_child(args, env) for args in arg_lists]
    return [finish_child(proc, err, log) for (proc, err), log in zip(started, log_files, strict=True)]


def search_row(model: str, kv: str, hbm: int, utilization: float, outside: int, max_tries: int, env: dict,
               logs: Path | None, width: int = 1) -> dict:  # fmt: skip
    """The real maximum batch of one row: search_max_batch over probes, each a fresh process under the same cap,
    `width` of them side by side per round. Each is given the largest outside-pool footprint seen so far (the
    plan's steps', then that of every probe that ran alone on the card)."""
    from planner import PlanOptions, load_config, make_plan

    plan = make_plan(load_config(model), PlanOptions(hbm_bytes=hbm, kv_dtype=kv, utilization=utilization))
    shortest, per_short = short_blocks(plan)
    seen, probes, t0 = {"outside": outside}, [], time.time()

    def fits_many(bs: list[int]) -> list[tuple[bool, str]]:
        t, alone = time.time(), str(int(len(bs) == 1))
        args = [["--probe", model, kv, str(hbm), str(utilization), str(b), str(seen["outside"]), alone] for b in bs]
        runs = run_probes(args, env, [logs / f"{model}_{kv}_{hbm}_B{b}.log" if logs else None for b in bs])
        out = []
        for b, (res, err) in zip(bs, runs, strict=True):
            if res is None:  # the process died (a crash inside a library reads here as its last lines)
                res = {"batch": b, "ok": False,
                       "error": "probe died: " + " | ".join(err.strip().splitlines()[-3:])[:200]}  # fmt: skip
            res["wall_seconds"] = round(time.time() - t, 1)
            probes.append(res)
            seen["outside"] = max(seen["outside"], res.get("outside") or 0)
            print(f"  [{time.strftime('%H:%M:%S')}] B={b} ({b * per_short + 1} blocks): "
                  f"{'fits' if res['ok'] else res['error'][:120]}  [{res['wall_seconds']:.0f}s, "
                  f"+{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
            out.append((res["ok"], res["error"] or "ok"))
        return out

    formula = formula_max_batch(plan)
    step = first_step(plan, formula)
    search = search_max_batch(lambda b: fits_many([b])[0], plan.max_num_seqs, first=step, growth=ROW_GROWTH,
                              max_tries=max_tries, width=width, fits_many=fits_many, gallop_down=True,
                              gallop_up=True)  # fmt: skip
    report = batch_report(search, plan.max_num_seqs, seq_cost(plan))
    for row, res in zip(report["tries"], probes, strict=True):
        row.update({k: v for k, v in res.items() if k not in row})
    report.update(formula=formula, first_step=step, width=width, shortest=shortest, blocks_per_seq=per_short,
                  budget=plan.budget_bytes, outside_start=outside, outside_max=seen["outside"],
                  seconds=round(time.time() - t0, 1))  # fmt: skip
    return report


def batch_cell(mb: dict) -> str:
    """The real maximum batch, or its bounds when the search stopped at its cap."""
    if mb["real"] is not None:
        return f"{mb['real']:,}"
    lo, hi = mb["bounds"]
    return f"[{lo:,}, {'?' if hi is None else f'{hi:,}'})"


def plan_with_reserve(model: str, kv: str, hbm: int, utilization: float, reserve: int) -> int:
    """The plan's maximum batch when its runtime reserve is `reserve` bytes (`plan.py --reserve`): with the
    memory measured outside JAX's pool on this machine, a plan calibrated to it instead of the default margin."""
    from planner import PlanOptions, load_config, make_plan

    options = PlanOptions(hbm_bytes=hbm, kv_dtype=kv, utilization=utilization, reserve_bytes=reserve)
    return make_plan(load_config(model), options).max_num_seqs


def measured_reserve(outside: int) -> int:
    """The `plan.py --reserve` this machine's measurement suggests: the memory measured outside JAX's pool plus the
    planner's allowance for its spread between runs (planner.memory.RESERVE_ALLOWANCE_BYTES)."""
    from planner.memory import RESERVE_ALLOWANCE_BYTES

    return outside + RESERVE_ALLOWANCE_BYTES


def print_calibrated(rows: list[dict], utilization: float) -> None:
    """Per searched row: the plan with this machine's measured reserve (`measured_reserve`), against the real
    maximum batch (what `plan.py --reserve` gives a user who measured their machine)."""
    rows = [r for r in rows if "max_batch" in r and r["max_batch"].get("real") is not None]
    if not rows:
        return
    print("\nplan with this machine's reserve (plan.py --reserve = memory measured outside JAX's pool + "
          "the planner's allowance for its spread):")  # fmt: skip
    print("model        kv        budget  reserve GiB  planned     real  diff seqs")
    for row in rows:
        reserve = measured_reserve(row["measured"]["reserve"])
        planned = plan_with_reserve(row["model"], row["kv_dtype"], row["hbm"], utilization, reserve)
        row["max_batch"]["planned_with_measured_reserve"] = planned
        real = row["max_batch"]["real"]
        print(f"{row['model']:12s} {row['kv_dtype']:9s} {row['budget']:6s} {reserve / 2**30:11.3f} {planned:8,d} "
              f"{real:8,d} {real - planned:+10,d}{'  ABOVE THE REAL MAXIMUM' if planned > real else ''}")  # fmt: skip


def print_summary(rows: list[dict]) -> None:
    print("\nterm          model        kv        budget   planned GiB  measured GiB   error")
    for row in rows:
        for term in ("params", "kv_pool", "activation", "reserve", "peak"):  # reserve measured = outside JAX's pool
            p, q = row["planned"][term], row["measured"][term]
            err = f"{100 * (p / q - 1):+.1f}%" if q else "n/a"
            print(f"{term:13s} {row['model']:12s} {row['kv_dtype']:9s} {row['budget']:6s} {p / 2**30:11.3f} "
                  f"{q / 2**30:13.3f} {err:>8s}")  # fmt: skip
    print("\nmax batch     model        kv        budget  planned  formula            real  diff seqs   diff %  "
          "diff GiB  MiB/seq (kv+ws)  tries  search s")  # fmt: skip
    for row in rows:
        if "max_batch" not in row:
            continue
        mb = row["max_batch"]
        cost = mb["seq_bytes"]
        note = (" CAP HIT" if mb["cap_hit"] else "") + ("" if mb["plan_fit"] else " PLAN DID NOT FIT")
        note += f" {mb['non_oom_failures']} NON-OOM FAILURES" if mb["non_oom_failures"] else ""
        print(f"{'':13s} {row['model']:12s} {row['kv_dtype']:9s} {row['budget']:6s} {mb['planned']:8,d} "
              f"{mb['formula']:8,d} {batch_cell(mb):>15s} {mb['diff_seqs']:+10,d} {mb['diff_pct']:+8.2f} "
              f"{mb['diff_bytes'] / 2**30:+9.3f}  {cost['total'] / 2**20:6.3f} ({cost['kv'] / 2**20:.2f}+"
              f"{cost['workspace'] / 2**20:.2f}) {len(mb['tries']):6d} {mb['seconds']:9.0f}{note}")  # fmt: skip
    print("(planned: plan.max_num_seqs; formula: the largest B the plan's own arithmetic allows; real: measured, "
          "or [fit, failed) bounds; diff = real - planned; MiB/seq: KV blocks at the shortest length + one "
          "activation row)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2,gpt2-medium,gpt2-xl")
    ap.add_argument("--kv-dtypes", default="bfloat16,int8")
    ap.add_argument("--budgets", default="24GB,full")
    ap.add_argument("--utilization", type=float, default=0.9)
    ap.add_argument("--max-tries", type=int, default=MAX_TRIES,
                    help="candidates of the real-max-batch search per row, one process each (0: no search)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--logs", default=None, help="a folder for every child's stderr (XLA's own messages)")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "KV", "HBM", "UTIL"), help=argparse.SUPPRESS)
    ap.add_argument("--parallel", type=int, default=1,
                    help="search candidates run side by side per round, as many as the card holds at the budget")
    ap.add_argument("--probe", nargs=7, metavar=("MODEL", "KV", "HBM", "UTIL", "B", "OUTSIDE", "ALONE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, kv, hbm, util = args.child
        print("RESULT " + json.dumps(child(m, kv, int(hbm), float(util))), flush=True)
        return
    if args.probe:
        m, kv, hbm, util, b, outside, alone = args.probe
        result = probe(m, kv, int(hbm), float(util), int(b), int(outside), alone == "1")
        print("RESULT " + json.dumps(result), flush=True)
        return

    from planner import parse_size

    total = gpu_total_bytes()
    logs = Path(args.logs) if args.logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for budget in args.budgets.split(","):
        hbm = total if budget == "full" else parse_size(budget)
        for model in args.models.split(","):
            for kv in args.kv_dtypes.split(","):
                env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{hbm * args.utilization / total:.6f}")
                t0 = time.time()
                if args.out and rows:  # after every row, so a run cut short keeps what it measured
                    Path(args.out).write_text(json.dumps(rows, indent=2))
                row, stderr = run_child(["--child", model, kv, str(hbm), str(args.utilization)], env,
                                        logs / f"{model}_{kv}_{hbm}_plan.log" if logs else None)  # fmt: skip
                if row is None:
                    print(f"{model} {kv} {budget}: child failed\n{stderr}", flush=True)
                    continue
                row["budget"] = budget
                rows.append(row)
                p, q = row["planned"], row["measured"]
                if row["failed"]:
                    print(f"  OOM: {row['failed']}", flush=True)
                print(f"  stages: {json.dumps(row['stages'])}", flush=True)
                print(f"{model:12s} {kv:9s} {budget:5s} peak plan {p['peak'] / 2**30:6.2f} GiB meas "
                      f"{q['peak'] / 2**30:6.2f} GiB ({100 * (p['peak'] / q['peak'] - 1):+.1f}%)  "
                      f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
                mib = math.ceil(measured_reserve(q["reserve"]) / 2**20)
                print(f"  this machine's reserve: plan.py --reserve {mib}MiB", flush=True)
                if args.max_tries < 1:
                    continue
                width = parallel_width(args.parallel, hbm * args.utilization, total)
                print(f"  real max batch search (outside JAX's pool {q['reserve'] / 2**30:.3f} GiB, {width} "
                      "side by side)", flush=True)  # fmt: skip
                mb = search_row(model, kv, hbm, args.utilization, q["reserve"], args.max_tries, env, logs, width)
                row["max_batch"] = mb
                print(f"{model:12s} {kv:9s} {budget:5s} max batch plan {mb['planned']:,} real {batch_cell(mb)} "
                      f"({mb['diff_pct']:+.2f}%, formula {mb['formula']:,})  search {mb['seconds']:.0f}s  "
                      f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    print_summary(rows)
    print_calibrated(rows, args.utilization)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
