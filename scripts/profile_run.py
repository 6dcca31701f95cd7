#!/usr/bin/env python
"""Memory and block-use timeline of a workload: a PNG, a JSON history and, with --trace, a jax.profiler trace.

    python scripts/profile_run.py --model gpt2 --requests 64 --hbm 2GB --png out/timeline.png [--trace out/trace]

Runs a seeded mixed workload through `jkv.Engine` with per-step history, then plots, per step: blocks used /
cached / free against the planned pool, internal fragmentation, running/waiting/swapped sequences, preemptions,
and the device's bytes in use against the planned peak (where the backend reports memory). With --trace the
workload first runs once untraced (compiling every step shape), then again under the profiler; the trace
directory opens in TensorBoard's profile plugin or Perfetto, to find gaps between GPU steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jkv  # noqa: E402
from jkv.bench.timeline import mixed_engine, plot  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2", help="preset name or checkpoint directory")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hbm", default=None, help="size the pool with the planner for this budget")
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--png", default="out/timeline.png")
    ap.add_argument("--json", default=None, help="write the per-step history here")
    ap.add_argument("--trace", default=None, help="write a jax.profiler trace into this directory")
    ap.add_argument(
        "--decode-steps",
        type=int,
        default=1,
        help="decode steps per device call (Engine(decode_steps=K); jkv.generate uses 8)",
    )
    args = ap.parse_args(argv)
    if args.decode_steps < 1:
        raise SystemExit(
            f"--decode-steps {args.decode_steps}: give a positive integer (1: one step per call)."
        )
    import warnings

    warnings.filterwarnings("ignore", message=".*random.*")
    model = jkv.load_model(args.model, dtype="bfloat16")

    def engine_with_workload():
        return mixed_engine(model, requests=args.requests, max_tokens=args.max_tokens, hbm=args.hbm,
                            num_blocks=args.num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                            decode_steps=args.decode_steps)  # fmt: skip

    if args.trace:
        # The same workload once untraced first, on an engine dropped before the traced one is built (one pool at a
        # time): every step shape is compiled before the trace starts, so the trace holds the run, not XLA's
        # compiling. (Compiling a multi-step shape inside a trace crashed the process on an H200:
        # CUDA_ERROR_LAUNCH_FAILED in XLA's GEMM autotuner, 2026-11-27.)
        engine_with_workload().run()
    eng = engine_with_workload()
    if args.trace:
        import jax

        with jax.profiler.trace(args.trace):
            eng.run()
            eng.synchronize()  # nothing left running when the trace stops
    else:
        eng.run()
    planned = eng.plan.peak_bytes if eng.plan is not None else None
    s = eng.stats()
    plot(eng.history, s.blocks_total, planned, Path(args.png))
    if args.json:
        Path(args.json).write_text(json.dumps(eng.history, indent=1))
    print(
        f"{s.step} steps, {s.tokens_generated} tokens, peak blocks {max(h['blocks_used'] for h in eng.history)}"
        f"/{s.blocks_total}, preemptions {s.preemptions_recompute + s.preemptions_swap}; timeline: {args.png}"
    )


if __name__ == "__main__":
    main()
