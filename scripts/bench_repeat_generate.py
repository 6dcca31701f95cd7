#!/usr/bin/env python
"""Two (or more) `jkv.generate` calls in one process: both finish, the second compiles nothing and device memory
stays flat. Prints one row per call (jkv.bench.repeat)."""

from __future__ import annotations

import argparse
import json

import jkv
from jkv.bench.repeat import repeat_generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--num-blocks", type=int, default=None, help="default: the planner, for what JAX's pool has")
    ap.add_argument("--no-prefix-caching", action="store_true", help="each call recomputes its prompts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = jkv.load_model(args.model, dtype=args.dtype)
    opts = {"max_num_seqs": args.max_num_seqs, "enable_prefix_caching": not args.no_prefix_caching}
    opts |= {"num_blocks": args.num_blocks} if args.num_blocks else {}
    rows = repeat_generate(model, calls=args.calls, batch=args.batch, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, **opts)  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'call':>4} {'seconds':>8} {'tok/s':>9} {'same':>5} {'compiles':>8} {'GiB in use':>10}")
    for r in rows:
        gib = (r["bytes_in_use"] or 0) / 2**30
        print(f"{r['call']:>4} {r['seconds']:>8.2f} {r['tok_per_s']:>9.0f} {str(r['same_tokens']):>5} "
              f"{r['compilations_total']:>8} {gib:>10.2f}")


if __name__ == "__main__":
    main()
