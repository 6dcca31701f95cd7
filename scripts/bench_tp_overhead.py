#!/usr/bin/env python
"""tp = 1 through the tensor-parallel code path against the tree before it: the same greedy tokens, and offline
tok/s within noise (issue 20's one-GPU check).

Each measurement is a fresh process running one tree (PYTHONPATH): random weights of a preset (seeded, the same in
both trees), `jkv.generate` over `--batch` random prompts with prefix caching off (every call does the whole
prefill and decode). The first call compiles; the median of the next `--calls` is reported. Trees alternate
(current, baseline, current, baseline, ...) for `--rounds`, so drift on the card shows as spread, not as a gap.

Make the baseline once, outside git's index (it travels with the working tree to the device machine):

    mkdir -p _baseline && git archive df03d09 jkv pallas_kernels kvspec planner | tar -x -C _baseline
    python scripts/bench_tp_overhead.py --baseline _baseline --models gpt2,qwen2.5-1.5b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
import jkv
model_name, batch, prompt_len, new_tokens, calls = sys.argv[1], *map(int, sys.argv[2:6])
model = jkv.load_model(model_name, dtype="bfloat16")
rng = np.random.default_rng(0)
prompts = [rng.integers(0, model.config.vocab_size, prompt_len).tolist() for _ in range(batch)]
sp = jkv.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
opts = dict(max_num_seqs=batch, max_seq_len=prompt_len + new_tokens, block_size=16, enable_prefix_caching=False,
            decode_steps=16)
times, tokens = [], None
for i in range(calls + 1):
    t0 = time.perf_counter()
    outs = jkv.generate(model, prompts, sp, **opts)
    times.append(time.perf_counter() - t0)
    got = [o.token_ids for o in outs]
    assert tokens is None or got == tokens, "a later call gave other greedy tokens"
    tokens = got
print(json.dumps({"times": times[1:], "first_call": times[0], "tokens": tokens}))
"""


def run_child(tree: Path, model: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    r = subprocess.run([sys.executable, "-c", CHILD, model, str(args.batch), str(args.prompt_len),
                        str(args.new_tokens), str(args.calls)], capture_output=True, text=True, env=env,
                       timeout=args.child_timeout, cwd=tree)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"bench_tp_overhead: the {tree} child failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, type=Path, help="a tree of jkv before tensor parallelism")
    ap.add_argument("--models", default="gpt2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per process, after one that compiles")
    ap.add_argument("--rounds", type=int, default=2, help="processes per tree, alternating")
    ap.add_argument("--child-timeout", type=int, default=400)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not (args.baseline / "jkv" / "engine.py").is_file():
        raise SystemExit(f"bench_tp_overhead: {args.baseline} holds no jkv tree: make it as the docstring says.")
    trees = {"tp path (current)": ROOT, "before (baseline)": args.baseline.resolve()}
    rows = []
    for model in args.models.split(","):
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                t0 = time.perf_counter()
                r = run_child(tree, model, args)
                runs[name].append(r)
                print(f"{model} {name}: first call {r['first_call']:.1f} s, calls "
                      f"{' '.join(f'{t:.3f}' for t in r['times'])} s [{time.perf_counter() - t0:.0f} s]",
                      flush=True)  # fmt: skip
        digests = {name: {hashlib.sha256(json.dumps(r["tokens"]).encode()).hexdigest()[:12] for r in rs}
                   for name, rs in runs.items()}  # fmt: skip
        cur, base = (runs[n][0]["tokens"] for n in trees)
        same = sum(a == b for a, b in zip(cur, base, strict=True))
        for name, rs in runs.items():
            times = [t for r in rs for t in r["times"]]
            med = statistics.median(times)
            rows.append({"model": model, "tree": name, "tok_per_s": args.batch * args.new_tokens / med,
                         "median_s": med, "min_s": min(times), "max_s": max(times),
                         "token_digests": sorted(digests[name]), "requests_equal_to_baseline": f"{same}/{len(cur)}"})  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    print(f"{'model':<14} {'tree':<20} {'tok/s':>9} {'median s':>9} {'min-max s':>15} {'equal to baseline':>18}")
    for r in rows:
        print(f"{r['model']:<14} {r['tree']:<20} {r['tok_per_s']:>9.0f} {r['median_s']:>9.3f} "
              f"{r['min_s']:>7.3f}-{r['max_s']:<7.3f} {r['requests_equal_to_baseline']:>18}")


if __name__ == "__main__":
    main()
