#!/usr/bin/env python
"""How long `Engine.warmup()` takes, compiling one shape at a time against several at once; a fresh process each.

    python scripts/bench_warmup.py [--model gpt2] [--batch 4] [--max-seq-len 256] [--decode-steps 8] [--threads 8,1]
        [--compile-cache DIR]

Each --threads value runs in its own process, so nothing is compiled before its warm-up (JAX's persistent cache
is off). The child builds a random-weight bfloat16 engine (max_num_seqs=--batch, contexts up to --max-seq-len),
times `warmup(greedy=True, threads=N)`, then serves a seeded mixed workload (3 x --batch requests, arriving two
engine steps apart, so the batch varies) and counts the XLA compilations made while serving: 0 means the warm-up
covered every shape. The children's greedy tokens must agree (parallel compilation must not change a result).

With --compile-cache DIR every child passes `Engine(compile_cache_dir=DIR)`: the first child fills the cache and
the later ones measure a restart that loads the stored executables from disk, without tracing (`--threads 8,8`);
each row counts the executables loaded (and JAX persistent-cache hits, if JAX's own cache was turned on). "start s" is the child's
whole time to ready: imports, random weights, engine, warm-up.
Prints one row per thread count; --out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jkv.bench.warmup import thread_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--batch", type=int, default=4, help="max_num_seqs")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--threads", default="8,1", help="a comma list; each runs in a fresh process")
    ap.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="every child keeps its compiled steps here as jkv's stored executables (rows after the first "
        "measure a restart)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        counts = [0]
    if any(t < 1 for t in counts):
        raise SystemExit(f"--threads {args.threads}: give positive integers, e.g. 8,1.")
    try:
        rows = thread_rows(args.model, args.batch, args.max_seq_len, args.decode_steps, counts, args.compile_cache,
                           on_row=lambda row: print(json.dumps(row), flush=True))  # fmt: skip
    except RuntimeError as err:  # a child failed, or the children's tokens differ
        raise SystemExit(str(err)) from None
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(
        f"{rows[0]['device']}, JAX {rows[0]['jax']}: {args.model}, batch {args.batch}, contexts <= "
        f"{args.max_seq_len}, decode_steps {args.decode_steps}; tokens equal across rows"
        + (f"; compile cache {args.compile_cache}" if args.compile_cache else "")
    )
    heads = ("threads", "shapes", "start s", "warm-up s", "XLA compiles", "stored loads", "xla hits", "while serving",
             "failed", "imports s", "weights s", "engine s", "load/compile s", "run s")  # fmt: skip
    widths = (7, 6, 7, 9, 12, 12, 8, 13, 6, 9, 9, 8, 14, 5)
    print(" ".join(f"{h:>{w}s}" for h, w in zip(heads, widths, strict=True)))
    for r in rows:
        print(
            f"{r['threads']:7d} {r['shapes']:6d} {r['start_s']:7.1f} {r['warmup_s']:9.1f} {r['compiles_in_warmup']:12d} "
            f"{r['executables_loaded']:12d} {r['cache_loads_in_warmup']:8d} {r['compiles_while_serving']:13d} "
            f"{r['parallel_failures']:6d} {r['imports_s']:9.1f} {r['weights_s']:9.1f} {r['engine_s']:8.1f} "
            f"{r['warmup_prepare_s']:14.1f} {r['warmup_run_s']:5.1f}"
        )


if __name__ == "__main__":
    main()
