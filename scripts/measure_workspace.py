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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.measure_memory import (
    ballast_chunks,
    compiled_analysis,
    finish_child,
    load_row,
    plan_activation,
    prefill_step,
    run_step,
    short_blocks,
    start_child,
)

MiB = 2**20


def process_bytes() -> int | None:
    """This process's device memory by nvidia-smi, or None where the container hides other PIDs."""
    import subprocess

    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         check=False, capture_output=True, text=True).stdout  # fmt: skip
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()) and used.strip().isdigit():
            return int(used) * MiB
    return None


def child(model_name: str, kv: str, batch: int, aot: bool = True) -> dict:
    """One batch of one row (module docstring); every peak is above the bytes in use before the first compile.
    aot=False: no ahead-of-time compile; the step compiles when it first runs, as in the engine (compile_peak and
    XLA's accounting are then absent)."""
    _, dev, plan, model = load_row(model_name, kv, 24 * 10**9, 0.9)  # (the plan sizes the prefill chunk only)
    import jax

    import jkv

    stats = dev.memory_stats
    params = stats()["bytes_in_use"]
    shortest, per_short = short_blocks(plan)
    eng = jkv.Engine(model, num_blocks=batch * per_short + 1, kv_dtype=kv, attention="auto",
                     max_num_seqs=max(batch, prefill_step(plan)[0]),  # room for the prefill's rows
                     max_num_batched_tokens=plan.workspaces[0].tokens)  # fmt: skip
    jax.block_until_ready(eng.pools)
    pool = stats()["bytes_in_use"] - params
    base = stats()["bytes_in_use"]
    out = {"model": model_name, "kv_dtype": kv, "batch": batch, "params": params, "pool": pool,
           "planned_activation": plan_activation(plan, batch), "shortest": shortest}  # fmt: skip
    out["decode"] = compiled_analysis(eng, batch, shortest, 1) if aot else {}
    out["decode"]["compile_peak"] = stats()["peak_bytes_in_use"] - base if aot else None
    run_step(eng, batch, shortest, 1)
    out["decode"]["run_peak"] = stats()["peak_bytes_in_use"] - base
    out["decode"]["largest_alloc"] = stats().get("largest_alloc_size")
    out["prefill"] = compiled_analysis(eng, *prefill_step(plan)) if aot else {}
    out["prefill"]["compile_peak"] = stats()["peak_bytes_in_use"] - base if aot else None
    run_step(eng, *prefill_step(plan))
    out["prefill"]["run_peak"] = stats()["peak_bytes_in_use"] - base
    s = stats()
    out["after_in_use"] = s["bytes_in_use"] - base
    used = process_bytes()
    out["outside"] = None if used is None else used - s.get("pool_bytes", s["bytes_reserved"])
    out["device"], out["jax"] = dev.device_kind, jax.__version__
    return out


def small_engine(model, kv: str, batch: int, chunk: int):
    """An engine whose pool is small (257 blocks): the steps' workspace does not depend on the pool's size (the
    pools are donated and updated in place), and a small pool leaves the card's memory to the step."""
    import jkv

    return jkv.Engine(model, num_blocks=257, kv_dtype=kv, max_num_seqs=batch, attention="auto",
                      max_num_batched_tokens=chunk)  # fmt: skip


def sweep_child(model_name: str, kv: str, batches: list[int]) -> dict:
    """XLA's accounting of the decode step at every batch in `batches` and of the plan's prefill chunk, compiled
    ahead of time in one process (nothing runs)."""
    _, dev, plan, model = load_row(model_name, kv, 24 * 10**9, 0.9)
    shortest, _ = short_blocks(plan)
    eng = small_engine(model, kv, max(*batches, prefill_step(plan)[0]), plan.workspaces[0].tokens)
    out = {"model": model_name, "kv_dtype": kv, "prefill": compiled_analysis(eng, *prefill_step(plan)), "decode": {}}
    out["prefill_step"] = prefill_step(plan)
    for b in batches:
        out["decode"][b] = compiled_analysis(eng, b, shortest, 1) | {"planned_activation": plan_activation(plan, b)}
    out["device"] = dev.device_kind
    return out


def free_child(model_name: str, kv: str, batch: int, free: int) -> dict:
    """Whether the decode step of `batch` rows compiles (XLA's autotuner allocates its candidates' buffers from the
    pool) and then runs, with only `free` bytes of JAX's pool left: ballast arrays hold the rest."""
    _, dev, plan, model = load_row(model_name, kv, 24 * 10**9, 0.9)
    import jax
    import jax.numpy as jnp

    shortest, _ = short_blocks(plan)
    eng = small_engine(model, kv, batch, plan.workspaces[0].tokens)
    jax.block_until_ready(eng.pools)
    s = dev.memory_stats()
    ballast = [jnp.zeros(n, jnp.uint8) for n in ballast_chunks(s["bytes_limit"] - s["bytes_in_use"] - free)]
    jax.block_until_ready(ballast)
    s = dev.memory_stats()
    out = {"model": model_name, "kv_dtype": kv, "batch": batch, "free_asked": free,
           "free": s["bytes_limit"] - s["bytes_in_use"], "compile_ok": False, "run_ok": False,
           "error": None}  # fmt: skip
    try:
        compiled_analysis(eng, batch, shortest, 1)
        out["compile_ok"] = True
        run_step(eng, batch, shortest, 1)
        out["run_ok"] = True
    except Exception as err:  # noqa: BLE001 - running out of memory is the answer
        out["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return out


def parse_rows(specs: list[str]) -> list[tuple[str, str, int]]:
    """`model:kv:b1,b2` -> [(model, kv, b1), (model, kv, b2)]."""
    jobs = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2]:
            raise SystemExit(f"--rows entry {spec!r} must read MODEL:KV_DTYPE:B1,B2 (e.g. gpt2:bfloat16:1024,4033).")
        jobs += [(parts[0], parts[1], int(b)) for b in parts[2].split(",")]
    return jobs


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


def run_children(arg_lists: list[list[str]], env: dict | list[dict], width: int) -> list[dict | None]:
    """Children of this script, `width` side by side (`env`: one for all, or one per child); their RESULTs in order
    (None for a child that died)."""
    envs = env if isinstance(env, list) else [env] * len(arg_lists)
    results = []
    for at in range(0, len(arg_lists), width):
        started = [start_child(args, e, script=__file__)
                   for args, e in zip(arg_lists[at : at + width], envs[at : at + width], strict=True)]  # fmt: skip
        for args, (proc, err) in zip(arg_lists[at : at + width], started, strict=True):
            res, tail = finish_child(proc, err)
            if res is None:
                print(f"child {' '.join(args)} failed\n{tail[-1500:]}", flush=True)
            results.append(res)
    return results


def free_search(targets: list[tuple[str, str, int, int, int]], width: int, rounds: int) -> list[dict]:
    """Per target (model, kv, batch, lo MiB, hi MiB): the least free pool memory with which the decode step compiles
    and runs, narrowed from [lo, hi] by `rounds` rounds of evenly spaced tries (all targets' tries side by side)."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.05")  # 7.5 GB a child on an H200: many fit
    bounds = {t[:3]: [t[3] * MiB, t[4] * MiB] for t in targets}  # [largest free that failed, smallest that ran]
    tries: list[dict] = []
    per = max(1, width // len(targets))
    for _ in range(rounds):
        jobs = []
        for (m, kv, b), (lo, hi) in bounds.items():
            jobs += [(m, kv, b, lo + (hi - lo) * i // (per + 1)) for i in range(1, per + 1)]
        results = run_children([["--free-child", m, kv, str(b), str(f)] for m, kv, b, f in jobs], env, width)
        for (m, kv, b, f), res in zip(jobs, results, strict=True):
            if res is None:
                continue
            tries.append(res)
            lo_hi = bounds[(m, kv, b)]
            if res["run_ok"]:
                lo_hi[1] = min(lo_hi[1], res["free"])
            else:
                lo_hi[0] = max(lo_hi[0], res["free"])
        print("  " + "  ".join(f"{m} {kv} B={b}: ({lo / MiB:.1f}, {hi / MiB:.1f}] MiB"
                               for (m, kv, b), (lo, hi) in bounds.items()), flush=True)  # fmt: skip
    return [{"model": m, "kv_dtype": kv, "batch": b, "need_above": lo, "need_at_most": hi,
             "tries": [t for t in tries if (t["model"], t["kv_dtype"], t["batch"]) == (m, kv, b)]}
            for (m, kv, b), (lo, hi) in bounds.items()]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=["gpt2:bfloat16:1024,4033"], help="MODEL:KV_DTYPE:B1,B2 ...")
    ap.add_argument("--parallel", type=int, default=4, help="processes side by side")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dump", default=None, help="XLA dump folder for the first batch of each row")
    ap.add_argument("--no-aot", action="store_true", help="no ahead-of-time compile: peaks of the engine's own path")
    ap.add_argument("--sweep", action="store_true",
                    help="compile only: XLA's accounting of every listed batch of a row in one process")
    ap.add_argument("--free", nargs="+", default=None, metavar="MODEL:KV:B:LO_MIB:HI_MIB",
                    help="search the least free memory with which the decode step compiles and runs")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the --free search")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "KV", "B", "AOT"), help=argparse.SUPPRESS)
    ap.add_argument("--sweep-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--free-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, kv, b, aot = args.child
        print("RESULT " + json.dumps(child(m, kv, int(b), aot == "1")), flush=True)
        return
    if args.sweep_child:
        m, kv, bs = args.sweep_child
        print("RESULT " + json.dumps(sweep_child(m, kv, [int(b) for b in bs.split(",")])), flush=True)
        return
    if args.free_child:
        m, kv, b, f = args.free_child
        print("RESULT " + json.dumps(free_child(m, kv, int(b), int(f))), flush=True)
        return
    if args.free:
        targets = []
        for spec in args.free:
            parts = spec.split(":")
            if len(parts) != 5 or not all(p.isdigit() for p in parts[2:]) or int(parts[3]) >= int(parts[4]):
                raise SystemExit(f"--free entry {spec!r} must read MODEL:KV_DTYPE:BATCH:LO_MIB:HI_MIB with LO < HI "
                                 "(e.g. gpt2:bfloat16:4096:700:1800).")  # fmt: skip
            targets.append((parts[0], parts[1], int(parts[2]), int(parts[3]), int(parts[4])))
        found = free_search(targets, args.parallel, args.rounds)
        if args.out:
            Path(args.out).write_text(json.dumps(found, indent=2))
        print("\nmodel        kv        batch  needs more than MiB  runs with MiB")
        for f in found:
            print(f"{f['model']:12s} {f['kv_dtype']:9s} {f['batch']:5d} {f['need_above'] / MiB:20.1f} "
                  f"{f['need_at_most'] / MiB:14.1f}")  # fmt: skip
        return
    if args.sweep:
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        specs = [spec.split(":") for spec in args.rows]
        rows = [r for r in run_children([["--sweep-child", *spec] for spec in specs], env, args.parallel) if r]
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
    jobs = parse_rows(args.rows)
    firsts = {(m, kv): b for m, kv, b in reversed(jobs)}
    envs = []
    for m, kv, b in jobs:
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        if args.dump and firsts[(m, kv)] == b:
            dump = Path(args.dump) / f"{m}_{kv}_B{b}"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
        envs.append(env)
    child_args = [["--child", m, kv, str(b), str(int(not args.no_aot))] for m, kv, b in jobs]
    rows = [r for r in run_children(child_args, envs, args.parallel) if r]
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
