#!/usr/bin/env python
"""How long a jitted call holds the calling thread, against the number of array arguments it takes.

    python scripts/bench_dispatch_args.py [--counts 1,24,172,344] [--donate 0,24]

The engine's step takes 148 parameter arrays (gpt2), 24 pool arrays (donated) and a few inputs, and its dispatch
holds the host for ~0.7-1.0 ms per call on an H200 (`profile_step.py --dispatch-probe`) whether or not the loop
runs as one CUDA graph. This script asks whether that time grows with the argument count: a jitted function of
n small float32 arrays (each read once: the outputs are n-element sums) is dispatched back to back and the median
time until the call returns is printed per n, with `--donate` of the arrays donated and returned (the pools'
pattern). The result is checked against NumPy before timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from jkv.bench import CheckFailed  # noqa: E402
from jkv.bench.dispatch import time_dispatch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="1,24,172,344", help="argument counts to time")
    ap.add_argument(
        "--donate", default="0,24", help="how many of the arguments are donated (capped at the count)"
    )
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    print(
        f"{jax.devices()[0].device_kind}, JAX {jax.__version__}: median time a call holds the calling thread"
    )
    print(f"{'arguments':>9s} {'donated':>7s} {'us per call':>11s} {'us per argument':>15s}")
    for n in (int(c) for c in args.counts.split(",")):
        for d in sorted({min(int(x), n) for x in args.donate.split(",")}):
            try:
                us = 1e6 * time_dispatch(n, d, args.calls)
            except CheckFailed as err:
                raise SystemExit(str(err)) from None
            print(f"{n:9d} {d:7d} {us:11.1f} {us / n:15.2f}", flush=True)


if __name__ == "__main__":
    main()
