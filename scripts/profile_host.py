#!/usr/bin/env python
"""Where the engine's host time goes: a cProfile of the engine loop on a model whose device work is tiny.

    python scripts/profile_host.py [--layers 12] [--rows 32] [--requests 96] [--top 20] [--decode-steps K] [--outputs finished|all]

The model has GPT-2's structure and argument count (12 layers: 148 parameter arrays, 24 pool arrays) but a width
of 64 and a 512-token vocabulary, so the device side of a step is small and the host side (scheduling, block
bookkeeping, building inputs, dispatching the jitted step, reading tokens, building outputs) dominates. Runs the
same seeded mixed workload three times: a warm-up (compiles every step shape), a timed pass, and a pass under
cProfile, whose table (sorted by own time, jkv functions and the dispatch/read calls) says which host work to cut.

Useful on any machine, GPU or not; on a CPU the "device" shares the host's cores, so `numpy.asarray` (waiting for
a step's tokens) includes the model's compute, and the jitted call's dispatch includes XLA CPU work done on the
calling thread. cProfile's per-call overhead inflates small functions; compare runs of this script only.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

import jkv  # noqa: E402
from jkv.bench.host import host_proxy_model, host_workload, profile_loop, top_functions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rows", type=int, default=32, help="max_num_seqs")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--async-scheduling", choices=("on", "off"), default="on")
    ap.add_argument("--decode-steps", type=int, default=1, help="Engine(decode_steps=...): multi-step decode")
    ap.add_argument(
        "--outputs",
        choices=("finished", "all"),
        default="finished",
        help="step(finished_only=True) as run() and the benchmarks drive it, or every request's output "
        "each step (streaming)",
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*random.*")

    model = host_proxy_model(args.layers)
    reqs = host_workload(args.requests, model.config.vocab_size)
    eng = jkv.Engine(model, num_blocks=args.rows * 64 + 1, block_size=16, max_num_seqs=args.rows,
                     max_num_batched_tokens=2048, enable_prefix_caching=False,
                     async_scheduling=args.async_scheduling == "on", decode_steps=args.decode_steps)  # fmt: skip
    steps, per_step, stats = profile_loop(eng, reqs, args.outputs == "finished")

    tokens = sum(o for _, o in reqs)
    print(f"{jax.devices()[0].device_kind}: {args.layers} layers, <= {args.rows} rows, {args.requests} requests, "
          f"async {args.async_scheduling}, decode_steps {args.decode_steps}, outputs {args.outputs}: {steps} steps, "
          f"{1e3 * per_step:.3f} ms per step, {1e6 * per_step * steps / tokens:.1f} us per output token (untraced)")  # fmt: skip
    print(f"{'function':58s} {'own ms/step':>11s} {'cum ms/step':>11s} {'calls/step':>10s}")
    for tottime, cumtime, ncalls, name in top_functions(stats, args.top):
        print(
            f"{name[:58]:58s} {1e3 * tottime / steps:11.3f} {1e3 * cumtime / steps:11.3f} {ncalls / steps:10.1f}"
        )


if __name__ == "__main__":
    main()
