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
the later ones measure a restart that loads the compiled steps from disk (`--threads 8,8`); each row counts the
executables loaded from the cache.
Prints one row per thread count; --out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def child(args) -> dict:
    import warnings

    import jax
    import numpy as np

    import jkv

    warnings.filterwarnings("ignore", message=".*(random|tokenizer).*")
    model = jkv.load_model(args.model, dtype="bfloat16")
    bs = 16
    eng = jkv.Engine(model, num_blocks=args.batch * -(-args.max_seq_len // bs) + 1, block_size=bs,
                     max_num_seqs=args.batch, max_seq_len=args.max_seq_len, max_num_batched_tokens=2048,
                     enable_prefix_caching=False, decode_steps=args.decode_steps,
                     compile_cache_dir=args.compile_cache)  # fmt: skip
    compiles: list[float] = []
    hits: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(duration) if event == COMPILE_EVENT else None
    )
    jax.monitoring.register_event_listener(lambda event, **_: hits.append(event) if event == CACHE_HIT_EVENT else None)
    report = eng.warmup(greedy=True, threads=args.child)
    warm_compiles, warm_hits = len(compiles), len(hits)
    rng = np.random.default_rng(0)
    reqs = []
    for _ in range(3 * args.batch):
        p = int(rng.integers(1, args.max_seq_len // 2))
        reqs.append((rng.integers(0, model.config.vocab_size, p).tolist(), int(rng.integers(1, args.max_seq_len - p))))
    final, step, t0 = {}, 0, time.perf_counter()
    while len(final) < len(reqs):
        if step % 2 == 0 and step // 2 < len(reqs):
            prompt, n = reqs[step // 2]
            eng.add_request(prompt, jkv.SamplingParams(max_tokens=n, ignore_eos=True), request_id=f"r{step // 2}")
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        step += 1
    digest = hashlib.sha256(json.dumps([final[f"r{i}"] for i in range(len(reqs))]).encode()).hexdigest()[:16]
    # JAX reports a compile event for an executable loaded from the persistent cache too: those are not compiles.
    return {"threads": args.child, "shapes": report["shapes"], "warmup_s": report["seconds"],
            "parallel_failures": report["parallel_failures"], "compiles_in_warmup": warm_compiles - warm_hits,
            "compiles_while_serving": len(compiles) - warm_compiles - (len(hits) - warm_hits),
            "serve_s": time.perf_counter() - t0,
            "cache_loads_in_warmup": warm_hits, "compile_cache": args.compile_cache,
            "tokens_sha256": digest, "device": jax.devices()[0].device_kind, "jax": jax.__version__}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--batch", type=int, default=4, help="max_num_seqs")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--threads", default="8,1", help="a comma list; each runs in a fresh process")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="every child keeps its compiled steps in JAX's persistent cache here (rows after the first "
                         "measure a restart)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    try:
        counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        counts = [0]
    if any(t < 1 for t in counts):
        raise SystemExit(f"--threads {args.threads}: give positive integers, e.g. 8,1.")
    rows = []
    base = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--max-seq-len",
            str(args.max_seq_len), "--decode-steps", str(args.decode_steps)]  # fmt: skip
    if args.compile_cache:
        base += ["--compile-cache", args.compile_cache]
    for t in counts:
        proc = subprocess.run([*base, "--child", str(t)], capture_output=True, text=True, env=dict(os.environ),
                              check=False)  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"the threads={t} child failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    if len({r["tokens_sha256"] for r in rows}) != 1:
        raise SystemExit("the children's greedy tokens differ: parallel compilation changed a result.")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"{rows[0]['device']}, JAX {rows[0]['jax']}: {args.model}, batch {args.batch}, contexts <= "
          f"{args.max_seq_len}, decode_steps {args.decode_steps}; tokens equal across rows"
          + (f"; persistent compilation cache {args.compile_cache}" if args.compile_cache else ""))
    heads = ("threads", "shapes", "warm-up s", "XLA compiles", "cache loads", "while serving", "failed")
    print(" ".join(f"{h:>{w}s}" for h, w in zip(heads, (7, 6, 9, 12, 11, 13, 6), strict=True)))
    for r in rows:
        print(f"{r['threads']:7d} {r['shapes']:6d} {r['warmup_s']:9.1f} {r['compiles_in_warmup']:12d} "
              f"{r['cache_loads_in_warmup']:11d} {r['compiles_while_serving']:13d} {r['parallel_failures']:6d}")


if __name__ == "__main__":
    main()
