#!/usr/bin/env python
"""The sampler's blocked pass on the device: jkv's in-place blocks against the padded lax.map it replaced.

    python scripts/bench_sampler.py [--batches 64,257,1024,4033] [--vocab 50257] [--iters 20]

Both run sample_tokens' per-block sampling (jkv.sampling._sample_rows) on the same float32 logits, inside a jitted
function that makes the logits and returns them (as the engine's step does). Tokens are checked equal before
timing; then warm-up, and the median of --iters timed calls (each blocked until ready). The compiled scratch
(XLA's temp) of each is printed beside it: the padded version copies [B, V] float32 logits when B is not a
multiple of the block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jkv.bench import CheckFailed  # noqa: E402
from jkv.bench.sampler import compare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="64,257,1024,4033")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    import jax
    import numpy as np

    print(f"device: {jax.devices()[0].device_kind}, JAX {jax.__version__}, vocab {args.vocab}")
    print(f"{'batch':>6s}  {'sampler':24s} {'median ms':>10s} {'temp MiB':>9s}")
    rng = np.random.default_rng(0)
    for b in (int(x) for x in args.batches.split(",")):
        try:
            timed = compare(b, args.vocab, args.iters, rng)
        except CheckFailed as err:
            raise SystemExit(str(err)) from None
        for name, seconds, temp in timed:
            print(f"{b:6d}  {name:24s} {1e3 * seconds:10.3f} {temp / 2**20:9.1f}")


if __name__ == "__main__":
    main()
