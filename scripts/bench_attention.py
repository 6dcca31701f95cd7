"""Benchmark jkv's paged decode attention against every JAX alternative, on one card, in one run.

For each shape (batch x context, GPT-2 MHA 12x64 and GQA 32q/8kv x 128, block size 16) it checks each
implementation against `paged_decode_attention_reference`, then times it:

  jkv        pallas_kernels.paged_decode_attention (bf16 pages; int8 pages + float16 scales; packed int4 pages +
             float16 scales per 32 elements)
  jax        jax.experimental.pallas.ops.gpu.paged_attention, best of a few configurations
  xla        dense XLA attention (einsum + softmax) on a contiguous [B, Hkv, T, D] cache
  copy       a large device-to-device copy: the bandwidth ceiling (bytes read + written / time)

Timing: each implementation is called n times back to back inside one jitted function (distinct query arrays,
K/V rotated over enough copies to defeat the 50 MB L2), warmed up, synchronized with block_until_ready; the
per-call time is (median T(n2) - median T(n1)) / (n2 - n1), which cancels dispatch overhead.
Effective bandwidth = K/V bytes the call must read (scales included) / time. The quantized columns (int8, int4)
are timed only when the kernel matches the reference on the same quantized pages (relative L2 error < 3e-2);
"vs bf16 err" is the quantization's own error against the bf16 result, for information.

    python scripts/bench_attention.py                 # the table (docs/benchmarks.md)
    python scripts/bench_attention.py --tune          # sweep kernel configurations at a few shapes
    python scripts/bench_attention.py --block-sizes   # block sizes 8..64 at 32x4k
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from jkv.bench.attention import (  # noqa: E402
    QUANT_KINDS,
    SHAPES,
    Shape,
    bench_shape,
    block_size_sweep,
    log,
    measure_copy,
    set_interpret,
    set_time_budget,
    tune,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2,gqa")
    ap.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in SHAPES), help="BxCTX list")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--block-sizes", action="store_true")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--no-xla", action="store_true")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--no-int4", action="store_true")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; sweeps stop starting after it")
    ap.add_argument("--tune-first", action="store_true", help="run --tune before the table")
    ap.add_argument("--interpret", action="store_true", help="CPU smoke test (use with tiny --shapes)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_attention.json"))
    args = ap.parse_args()
    set_interpret(args.interpret)
    if args.time_budget:
        set_time_budget(args.time_budget)

    dev = jax.devices()[0]
    meta = dict(
        device=dev.device_kind,
        platform=dev.platform,
        jax=jax.__version__,
        date=datetime.date.today().isoformat(),
        command=" ".join(sys.argv),
    )
    log(json.dumps(meta))
    copy_bw = measure_copy(1 << 24 if args.interpret else 1 << 30)
    log(f"device copy: {copy_bw / 1e12:.3f} TB/s (read + write)")
    out = dict(meta=meta, copy_bw=copy_bw)
    if args.tune and args.tune_first:
        out["tune"] = tune(copy_bw)
    if not args.no_table:
        table = []
        for model in args.models.split(","):
            for spec in args.shapes.split(","):
                b, c = (int(x) for x in spec.split("x"))
                kinds = tuple(k for k in QUANT_KINDS if not getattr(args, f"no_{k}"))
                r = bench_shape(Shape(model, b, c), copy_bw, kinds, not args.no_jax, not args.no_xla)
                table.append(r)
                log(json.dumps(r))
                with open(args.json, "w") as f:
                    json.dump(dict(out, table=table), f, indent=1)
        out["table"] = table
    if args.block_sizes:
        out["block_sizes"] = block_size_sweep(copy_bw)
    if args.tune and not args.tune_first:
        out["tune"] = tune(copy_bw)
    if out.get("tune"):
        best = {}
        for r in out["tune"]:
            key = (r["shape"], r["dtype"], r.get("dot"))
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
        log("\nbest tuned configurations:")
        for r in best.values():
            log(
                f"  {r['shape']} {r['dtype']}{' dot' if r.get('dot') else ''}: T={r['T']} warps={r['warps']} stages={r['stages']} "
                f"splits={r['splits']}: {r['us']:.1f} us, {r['pct']:.1f}% of copy"
            )
    if "table" in out:
        print_table(out)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


def print_table(out):
    cb = out["copy_bw"]
    log(
        f"\n{out['meta']['device']}, JAX {out['meta']['jax']}, {out['meta']['date']}; copy {cb / 1e12:.2f} TB/s"
    )
    log(
        "| shape | jkv bf16 us | TB/s | % copy | JAX kernel us (cfg) | % copy | jkv/JAX | XLA contig us | % copy "
        "| jkv int8 us | int8 speedup | jkv int4 us | int4 TB/s | int4 % copy | int4 vs bf16 |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out["table"]:

        def g(k, fmt="{:.1f}"):
            return fmt.format(r[k]) if k in r else "-"

        def speedup(r, kind):  # bf16 time / quantized time: > 1 means the quantized pages are faster
            return f"{r['jkv_us'] / r[f'{kind}_us']:.2f}x" if f"{kind}_us" in r else "-"

        ratio = f"{r['jax_us'] / r['jkv_us']:.2f}x" if "jax_us" in r else "-"
        int4_tbs = f"{r['int4_bw'] / 1e12:.2f}" if "int4_bw" in r else "-"
        log(
            f"| {r['shape']} | {g('jkv_us')} | {r['jkv_bw'] / 1e12:.2f} | {g('jkv_pct')} | {g('jax_us')} "
            f"{r.get('jax_cfg', '')} | {g('jax_pct')} | {ratio} | {g('xla_us')} | {g('xla_pct')} | {g('int8_us')} "
            f"| {speedup(r, 'int8')} | {g('int4_us')} | {int4_tbs} | {g('int4_pct')} | {speedup(r, 'int4')} |"
        )


if __name__ == "__main__":
    main()
