#!/usr/bin/env python
"""The device memory of the engine's steps beyond parameters and KV pool, by decode batch: what the planner's
activation term must cover. One fresh process per (model, KV dtype, batch), several side by side.

    python scripts/measure_workspace.py --rows gpt2:bfloat16:1024,2048,4033 gpt2-xl:bfloat16:222,444 \
        [--parallel 5] [--out rows.json] [--dump DIR]

Each process builds an engine of exactly batch * per_short + 1 blocks (as `measure_memory.py`'s search does), then:

1. compiles the decode step of `batch` rows at the shortest listed length (sampling on) ahead of time and reads
   `peak_bytes_in_use`: the compile's own scratch (XLA's GEMM autotuner runs its candidates on buffers it
   allocates from the same pool);
2. runs that step and reads the peak again: the larger of the compile's scratch and the step's live buffers;
3. compiles and runs the plan's prefill chunk the same way.

Peaks are reported above the bytes in use before step 1 (parameters + pool + the step's small inputs). XLA's own
accounting of each step (`memory_analysis()`: temp, outputs not aliased to the donated pools, arguments) is printed
beside it, with the planner's activation term at the same batch. The peak counter cannot be reset,
so each batch gets its own process. Processes share the card without preallocating; none of them hits a limit.

--dump DIR writes XLA's buffer assignment of every step of the first process of each row (XLA_FLAGS
--xla_dump_to), whose "memory usage report" names the buffers live at the step's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jkv.bench.workspace import MiB, free_search, parse_free, parse_rows, run_children  # noqa: E402


def print_table(rows: list[dict]) -> None:
    def mib(x: int | None) -> str:
        return "-" if x is None else f"{x / MiB:.1f}"

    print("\nmodel        kv        batch  temp MiB  out MiB  compile pk  run pk  prefill pk  planned MiB  "
          "plan-run MiB  outside MiB")  # fmt: skip
    for r in rows:
        d, p = r["decode"], r["prefill"]
        run = max(d["run_peak"], p["run_peak"])
        out = d["output"] - d["alias"] if "output" in d else None
        print(f"{r['model']:12s} {r['kv_dtype']:9s} {r['batch']:5d} {mib(d.get('temp')):>9s} {mib(out):>8s} "
              f"{mib(d['compile_peak']):>11s} {mib(d['run_peak']):>7s} {mib(p['run_peak']):>11s} "
              f"{mib(r['planned_activation']):>12s} {mib(r['planned_activation'] - run):>13s} "
              f"{mib(r['outside']):>12s}")  # fmt: skip
    print("(peaks above parameters + pool + inputs; compile pk: after compiling the decode step ahead of time; run "
          "pk: after running it; prefill pk: after the prefill chunk too; plan-run: the planner's activation term "
          "minus the largest run peak; outside: this process's device memory outside JAX's pool)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=["gpt2:bfloat16:1024,4033"], help="MODEL:KV_DTYPE:B1,B2 ...")
    ap.add_argument("--parallel", type=int, default=4, help="processes side by side")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dump", default=None, help="XLA dump folder for the first batch of each row")
    ap.add_argument(
        "--no-aot", action="store_true", help="no ahead-of-time compile: peaks of the engine's own path"
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="compile only: XLA's accounting of every listed batch of a row in one process",
    )
    ap.add_argument(
        "--free",
        nargs="+",
        default=None,
        metavar="MODEL:KV:B:LO_MIB:HI_MIB",
        help="search the least free memory with which the decode step compiles and runs",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the --free search")
    args = ap.parse_args()
    if args.free:
        try:
            targets = parse_free(args.free)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        found = free_search(targets, args.parallel, args.rounds)
        if args.out:
            Path(args.out).write_text(json.dumps(found, indent=2))
        print("\nmodel        kv        batch  needs more than MiB  runs with MiB")
        for f in found:
            print(f"{f['model']:12s} {f['kv_dtype']:9s} {f['batch']:5d} {f['need_above'] / MiB:20.1f} "
                  f"{f['need_at_most'] / MiB:14.1f}")  # fmt: skip
        return
    try:
        jobs = parse_rows(args.rows)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.sweep:
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        sweeps = [("jkv.bench.workspace:sweep_child", {"model_name": m, "kv": kv, "batches": [int(b) for b in bs.split(",")]})
                  for m, kv, bs in (spec.split(":") for spec in args.rows)]  # fmt: skip
        rows = [r for r in run_children(sweeps, env, args.parallel) if r]
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
        print("\nmodel        kv        batch  temp MiB  out-alias MiB  planned MiB")
        for r in rows:
            for b, d in r["decode"].items():
                print(f"{r['model']:12s} {r['kv_dtype']:9s} {int(b):5d} {d['temp'] / MiB:9.1f} "
                      f"{(d['output'] - d['alias']) / MiB:14.1f} {d['planned_activation'] / MiB:12.1f}")  # fmt: skip
            p = r["prefill"]
            print(f"{r['model']:12s} {r['kv_dtype']:9s} prefill {r['prefill_step']} temp {p['temp'] / MiB:.1f} "
                  f"out-alias {(p['output'] - p['alias']) / MiB:.1f}")  # fmt: skip
        return
    firsts = {(m, kv): b for m, kv, b in reversed(jobs)}
    envs = []
    for m, kv, b in jobs:
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        if args.dump and firsts[(m, kv)] == b:
            dump = Path(args.dump) / f"{m}_{kv}_B{b}"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
        envs.append(env)
    child_jobs = [("jkv.bench.workspace:workspace_child", {"model_name": m, "kv": kv, "batch": b, "aot": not args.no_aot})
                  for m, kv, b in jobs]  # fmt: skip
    rows = [r for r in run_children(child_jobs, envs, args.parallel) if r]
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
