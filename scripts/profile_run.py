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

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import jkv  # noqa: E402


def plot(history: list[dict], blocks_total: int, planned_peak: int | None, png: Path) -> None:
    steps = np.arange(len(history))
    col = lambda k: np.array([h[k] if h.get(k) is not None else np.nan for h in history], float)  # noqa: E731
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    ax.stackplot(steps, col("blocks_used"), col("blocks_cached"), labels=["used", "cached (reusable)"], alpha=0.8)
    ax.axhline(blocks_total, color="k", ls="--", lw=1, label=f"planned pool ({blocks_total} blocks)")
    ax.set_ylabel("KV blocks")
    ax.legend(loc="upper right")
    ax = axes[1]
    ax.plot(steps, 100 * col("internal_fragmentation"), label="internal fragmentation %")
    ax.plot(steps, 100 * col("prefix_hit_rate"), label="prefix hit rate %")
    ax2 = ax.twinx()
    for k in ("running", "waiting", "swapped"):
        ax2.plot(steps, col(k), ls=":", label=k)
    ax2.plot(steps, col("preemptions_recompute") + col("preemptions_swap"), ls="-.", label="preemptions")
    ax.set_ylabel("%")
    ax2.set_ylabel("sequences")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax = axes[2]
    used = col("bytes_in_use") / 2**30
    if np.isfinite(used).any():
        ax.plot(steps, used, label="measured bytes in use")
        ax.plot(steps, col("peak_bytes_in_use") / 2**30, label="measured peak")
    if planned_peak:
        ax.axhline(planned_peak / 2**30, color="r", ls="--", label="planned peak")
    if np.isfinite(used).any() or planned_peak:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "this backend reports no memory statistics (CPU); run on a GPU for this panel",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("device memory (GiB)")
    ax.set_xlabel("engine step")
    fig.suptitle("jkv: planned vs measured memory and block use")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


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
    ap.add_argument("--decode-steps", type=int, default=1,
                    help="decode steps per device call (Engine(decode_steps=K); jkv.generate uses 8)")
    args = ap.parse_args(argv)
    if args.decode_steps < 1:
        raise SystemExit(f"--decode-steps {args.decode_steps}: give a positive integer (1: one step per call).")
    import warnings

    warnings.filterwarnings("ignore", message=".*random.*")
    model = jkv.load_model(args.model, dtype="bfloat16")

    def engine_with_workload():
        eng = jkv.Engine(model, hbm=args.hbm, num_blocks=args.num_blocks, block_size=args.block_size,
                         max_num_seqs=args.max_num_seqs, max_seq_len=min(model.config.n_positions, 1024),
                         record_history=True, decode_steps=args.decode_steps)  # fmt: skip
        rng = np.random.default_rng(0)
        limit = eng.max_seq_len - args.max_tokens
        for _ in range(args.requests):
            n = int(np.clip(rng.lognormal(np.log(max(2, limit // 4)), 0.7), 1, limit))
            eng.add_request(rng.integers(0, model.config.vocab_size, n).tolist(),
                            jkv.SamplingParams(max_tokens=int(rng.integers(1, args.max_tokens + 1)), ignore_eos=True))  # fmt: skip
        return eng

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
    plot(eng.history, eng.manager.num_blocks - 1, planned, Path(args.png))
    if args.json:
        Path(args.json).write_text(json.dumps(eng.history, indent=1))
    s = eng.stats()
    print(f"{s.step} steps, {s.tokens_generated} tokens, peak blocks {max(h['blocks_used'] for h in eng.history)}"
          f"/{s.blocks_total}, preemptions {s.preemptions_recompute + s.preemptions_swap}; timeline: {args.png}")


if __name__ == "__main__":
    main()
