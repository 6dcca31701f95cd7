#!/usr/bin/env python
"""Plan vs measured GPU memory, term by term, one fresh process per row.

    python scripts/measure_memory.py [--models gpt2,gpt2-xl] [--kv-dtypes bfloat16,int8] [--budgets 24GB,full]

For each (model, KV dtype, budget) a child process caps JAX's allocator at the plan's budget
(XLA_PYTHON_CLIENT_MEM_FRACTION = hbm * utilization / card memory, preallocated as JAX does by default: one
region, so the allocator cannot fragment by growing; `full` = the whole card), builds the engine's
pools from the plan, and runs the largest steps the plan promises on the engine's own jitted step functions:
a prefill of `prefill_chunk` tokens and decode steps at the planned maximum batch (at 128 tokens and at the
maximum length), with the sampling path on (the sampler's sort is the widest workspace). It reads
`memory_stats()` after each stage and the card's used memory (nvidia-smi) at the end, then searches upwards for
the largest decode batch that still runs (the real maximum) under the same cap.

Measured terms: parameters = bytes_in_use after loading; KV pool = growth when the pools are allocated;
activation = peak_bytes_in_use - parameters - pool; outside JAX's pool = the process's device memory
(nvidia-smi) - the allocator's pool (CUDA context, loaded kernels, cuBLAS/cuDNN handles). Measured peak =
peak_bytes_in_use + outside-pool bytes: everything the process needs on the card. (With a preallocated pool,
nvidia-smi alone always shows the cap, whatever the process really uses.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gpu_used_bytes() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.split()[0]) * 2**20


def gpu_total_bytes() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.split()[0]) * 2**20


def child(model_name: str, kv: str, hbm: int, utilization: float) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import jax

    import jkv
    from jkv.runner import bucket, build_inputs
    from planner import PlanOptions, load_config, make_plan

    base = gpu_used_bytes()
    dev = jax.devices()[0]
    plan = make_plan(load_config(model_name), PlanOptions(hbm_bytes=hbm, kv_dtype=kv, utilization=utilization))
    model = jkv.load_model(model_name, dtype="bfloat16")
    jax.block_until_ready(model.params)
    params = dev.memory_stats()["bytes_in_use"]
    eng = jkv.Engine(model, num_blocks=plan.layout.num_blocks, kv_dtype=kv, max_num_seqs=plan.max_num_seqs,
                     max_num_batched_tokens=plan.workspaces[0].tokens, attention="auto")  # fmt: skip
    jax.block_until_ready(eng.pools)
    pool = dev.memory_stats()["bytes_in_use"] - params
    bs, max_len = plan.layout.block_size, plan.max_seq_len
    usable = plan.layout.usable_blocks

    def run_step(rows: int, ctx: int, chunk: int) -> None:
        per = math.ceil(ctx / bs)
        table = lambda r: [1 + (r * per + i) % usable for i in range(per)]  # noqa: E731 - any blocks will do
        new = [1] * (chunk if chunk > 1 else 1)
        start = ctx - len(new)
        x = build_inputs([(new, start, table(r), 1.0, 0, 0.9, r, 0) for r in range(rows)], block_size=bs,
                         chunk=chunk, width=bucket(per), batch=rows)  # fmt: skip
        toks, logits, eng.pools = eng.runner.run(eng.pools, x, decode=chunk == 1, greedy=False)
        jax.block_until_ready((toks, logits))

    def compiled_temp(rows: int, ctx: int, chunk: int) -> int:
        per = math.ceil(ctx / bs)
        x = build_inputs([([1] * chunk, ctx - chunk, [1] * per, 1.0, 0, 0.9, r, 0) for r in range(rows)],
                         block_size=bs, chunk=chunk, width=bucket(per), batch=rows)  # fmt: skip
        ma = eng.runner.lower(eng.pools, x, decode=chunk == 1, greedy=False).compile().memory_analysis()
        return int(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)

    prefill_rows = max(1, plan.workspaces[0].tokens // max_len)
    prefill_chunk = min(max_len, plan.workspaces[0].tokens)
    b_long = plan.max_batch(max_len)
    stages = {
        "compiled_prefill": compiled_temp(prefill_rows, max_len, prefill_chunk),
        "compiled_decode_max_batch": compiled_temp(plan.max_num_seqs, min(128, max_len), 1),
        "compiled_decode_256": compiled_temp(256, min(128, max_len), 1),
    }
    failed = None
    for name, args in (("prefill", (prefill_rows, max_len, prefill_chunk)),
                       ("decode_max_batch", (plan.max_num_seqs, min(128, max_len), 1)),
                       ("decode_max_len", (b_long, max_len, 1))):  # fmt: skip
        try:
            run_step(*args)
        except Exception as err:  # noqa: BLE001 - an OOM here means the plan over-promised
            failed = f"{name}: {type(err).__name__}: {str(err)[:200]}"
            break
        stages[name] = dev.memory_stats()["peak_bytes_in_use"]
    stats = dev.memory_stats()
    peak = stats["peak_bytes_in_use"]
    outside = gpu_used_bytes() - base - stats.get("pool_bytes", stats["bytes_limit"])
    # the real maximum decode batch under the same cap (activation-limited; K/V capacity is exact arithmetic)
    largest, tried = (plan.max_num_seqs if failed is None else 0), []
    for factor in (() if failed else (1.25, 1.5, 2.0)):
        b = int(plan.max_num_seqs * factor)
        try:
            run_step(b, min(128, max_len), 1)
            largest = b
            tried.append((b, "ok"))
        except Exception as err:  # noqa: BLE001 - RESOURCE_EXHAUSTED is the answer we are looking for
            tried.append((b, type(err).__name__))
            break
    return {
        "model": model_name, "kv_dtype": kv, "hbm": hbm, "bytes_limit": stats["bytes_limit"],
        "planned": {"params": plan.param_bytes, "kv_pool": plan.kv_pool_bytes, "activation": plan.activation_bytes,
                    "reserve": plan.reserve_bytes, "peak": plan.peak_bytes},
        "measured": {"params": params, "kv_pool": pool, "activation": peak - params - pool,
                     "reserve": outside, "peak": peak + outside, "peak_in_use": peak},
        "largest_free_block": stats.get("largest_free_block_bytes"),
        "stages": stages, "planned_max_batch": plan.max_num_seqs, "planned_batch_at_max_len": b_long,
        "real_max_batch_lower_bound": largest, "search": tried, "failed": failed, "device": dev.device_kind, "jax": jax.__version__,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2,gpt2-medium,gpt2-xl")
    ap.add_argument("--kv-dtypes", default="bfloat16,int8")
    ap.add_argument("--budgets", default="24GB,full")
    ap.add_argument("--utilization", type=float, default=0.9)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "KV", "HBM", "UTIL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, kv, hbm, util = args.child
        print("RESULT " + json.dumps(child(m, kv, int(hbm), float(util))), flush=True)
        return

    from planner import parse_size

    total = gpu_total_bytes()
    rows = []
    for budget in args.budgets.split(","):
        hbm = total if budget == "full" else parse_size(budget)
        for model in args.models.split(","):
            for kv in args.kv_dtypes.split(","):
                env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{hbm * args.utilization / total:.4f}")
                t0 = time.time()
                if args.out and rows:  # after every row, so a run cut short keeps what it measured
                    Path(args.out).write_text(json.dumps(rows, indent=2))
                r = subprocess.run([sys.executable, __file__, "--child", model, kv, str(hbm), str(args.utilization)],
                                   capture_output=True, text=True, env=env)  # fmt: skip
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    print(f"{model} {kv} {budget}: child failed\n{r.stderr[-3000:]}", flush=True)
                    continue
                row = json.loads(line[0][7:])
                row["budget"] = budget
                rows.append(row)
                p, q = row["planned"], row["measured"]
                if row["failed"]:
                    print(f"  OOM: {row['failed']}", flush=True)
                print(f"  stages: {json.dumps(row['stages'])}", flush=True)
                print(f"{model:12s} {kv:9s} {budget:5s} peak plan {p['peak'] / 2**30:6.2f} GiB meas "
                      f"{q['peak'] / 2**30:6.2f} GiB ({100 * (p['peak'] / q['peak'] - 1):+.1f}%)  "
                      f"[{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print("\nterm          model        kv        budget   planned GiB  measured GiB   error")
    for row in rows:
        for term in ("params", "kv_pool", "activation", "reserve", "peak"):  # reserve measured = outside JAX's pool
            p, q = row["planned"][term], row["measured"][term]
            err = f"{100 * (p / q - 1):+.1f}%" if q else "n/a"
            print(f"{term:13s} {row['model']:12s} {row['kv_dtype']:9s} {row['budget']:6s} {p / 2**30:11.3f} "
                  f"{q / 2**30:13.3f} {err:>8s}")  # fmt: skip
        print(f"{'max batch':13s} {row['model']:12s} {row['kv_dtype']:9s} {row['budget']:6s} "
              f"{row['planned_max_batch']:11d} {row['real_max_batch_lower_bound']:13d}  search {row['search']}")  # fmt: skip


if __name__ == "__main__":
    main()
