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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jkv.bench import child as harness  # noqa: E402
from jkv.bench.memory import (  # noqa: E402
    calibrate,
    gpu_total_bytes,
    measured_reserve,
    parallel_width,
    search_row,
)
from jkv.bench.search import MAX_TRIES, batch_cell  # noqa: E402


def print_calibrated(rows: list[dict], utilization: float) -> None:
    """Per searched row: the plan with this machine's measured reserve (`measured_reserve`), against the real
    maximum batch (what `plan.py --reserve` gives a user who measured their machine)."""
    calibrated = calibrate(rows, utilization)
    if not calibrated:
        return
    print("\nplan with this machine's reserve (plan.py --reserve = memory measured outside JAX's pool + "
          "the planner's allowance for its spread):")  # fmt: skip
    print("model        kv        budget  reserve GiB  planned     real  diff seqs")
    for row, reserve, planned, above in calibrated:
        real = row["max_batch"]["real"]
        print(f"{row['model']:12s} {row['kv_dtype']:9s} {row['budget']:6s} {reserve / 2**30:11.3f} {planned:8,d} "
              f"{real:8,d} {real - planned:+10,d}{'  ABOVE THE REAL MAXIMUM' if above else ''}")  # fmt: skip


def print_summary(rows: list[dict]) -> None:
    print("\nterm          model        kv        budget   planned GiB  measured GiB   error")
    for row in rows:
        if "measured" not in row:  # a search-only row (--outside)
            continue
        for term in (
            "params",
            "kv_pool",
            "activation",
            "reserve",
            "peak",
        ):  # reserve measured = outside JAX's pool
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


def search_only(model: str, kv: str, budget: str, hbm: int, outside: int, args, env: dict, logs) -> dict:
    """One row's real-maximum search alone, from a given outside-pool footprint (no plan-steps child)."""
    if args.max_tries < 1:
        raise SystemExit("measure_memory: --outside skips the plan's steps, so it needs --max-tries of 1 or more.")
    width = parallel_width(args.parallel, hbm * args.utilization, gpu_total_bytes())
    t0 = time.time()
    print(f"{model} {kv} {budget}: real max batch search from {outside / 2**30:.3f} GiB outside JAX's pool, "
          f"{width} side by side", flush=True)  # fmt: skip
    mb = search_row(model, kv, hbm, args.utilization, outside, args.max_tries, env, logs, width)
    print(f"{model:12s} {kv:9s} {budget:5s} max batch plan {mb['planned']:,} real {batch_cell(mb)} "
          f"({mb['diff_pct']:+.2f}%, formula {mb['formula']:,})  search {mb['seconds']:.0f}s  "
          f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    return {"model": model, "kv_dtype": kv, "budget": budget, "hbm": hbm, "outside_given": outside,
            "planned_max_batch": mb["planned"], "max_batch": mb}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2,gpt2-medium,gpt2-xl")
    ap.add_argument("--kv-dtypes", default="bfloat16,int8")
    ap.add_argument("--budgets", default="24GB,full")
    ap.add_argument("--utilization", type=float, default=0.9)
    ap.add_argument(
        "--max-tries",
        type=int,
        default=MAX_TRIES,
        help="candidates of the real-max-batch search per row, one process each (0: no search)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--logs", default=None, help="a folder for every child's stderr (XLA's own messages)")
    ap.add_argument(
        "--outside",
        default=None,
        help="search only: skip the plan's steps and start each row's search from this outside-pool footprint "
        "(e.g. 640MiB, as an earlier run of the same rows measured it)",
    )
    ap.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="search candidates run side by side per round, as many as the card holds at the budget",
    )
    args = ap.parse_args()

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
                if args.outside is not None:
                    rows.append(search_only(model, kv, budget, hbm, parse_size(args.outside), args, env, logs))
                    continue
                kwargs = {"model_name": model, "kv": kv, "hbm": hbm, "utilization": args.utilization}
                log_file = logs / f"{model}_{kv}_{hbm}_plan.log" if logs else None
                row, stderr, *_ = harness.run("jkv.bench.memory:plan_child", kwargs, env, log_file=log_file)
                if row is None:
                    print(f"{model} {kv} {budget}: child failed\n{stderr}", flush=True)
                    continue
                row["budget"] = budget
                rows.append(row)
                p, q = row["planned"], row["measured"]
                if row["failed"]:
                    print(f"  failed: {row['failed']}", flush=True)
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
                mb = search_row(
                    model, kv, hbm, args.utilization, q["reserve"], args.max_tries, env, logs, width
                )
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
