#!/usr/bin/env python
"""End-to-end generation throughput on one card: jkv paged vs static padded batching vs Hugging Face generate().

    python scripts/bench_generate.py --model gpt2 --requests 256 --batch 32 [--hf-requests 64] [--out FILE]

Workload: a seeded synthetic set of requests with log-normal prompt and output lengths (prompt + output <=
--max-seq-len), EOS ignored, random weights of the named preset (a GPT-2 size or a Llama-family shape such as
llama-3.1-8b) in bfloat16. In one run:

- jkv paged, continuous batching, at most --batch sequences at once, the decode rows of each round running
  --decode-steps steps per device call (multi-step decode; `--single-step-row` adds the same run at 1 step per
  call);
- jkv paged with the KV memory a static batch of --batch full-length sequences would reserve (more sequences
  fit, since real ones are shorter);
- jkv static padded batching: requests in arrival order in batches of --batch, each batch padded to its longest
  prompt and run for its longest output on a contiguous cache (the naive baseline: jkv.reference);
- Hugging Face `generate()` in PyTorch, same lengths, batches of --batch (if torch and transformers import).

Correctness first: the paged engine must reproduce the dense reference's greedy tokens (float32 copy of the
model) before anything is timed. Each configuration first replays the timed workload untimed, so compilation
stays out of the timing. Reports output tokens/s, time per output token, peak device memory, KV memory waste,
per-request latency percentiles (`RequestOutput.metrics`; with --arrival-rate also served online, Poisson
arrivals, latency from each request's arrival), and on a GPU the idle share of the engine's loop
(`idle_probe`: traced kernel busy time against the untraced wall time of the same engine steps, in a child
process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jkv  # noqa: E402
from jkv.bench import CheckFailed  # noqa: E402
from jkv.bench.generate import (  # noqa: E402
    check_correct,
    hf_generate,
    paged_engine,
    peak_bytes,
    pool_blocks,
    request_set,
    run_idle_probe,
    static_padded,
    time_decode_step,
)
from jkv.bench.probe import GENERATE_DECODE_STEPS, StepProbe  # noqa: E402
from jkv.bench.serving import drive, drive_online, latency_stats, poisson_arrivals  # noqa: E402
from kvspec.layout import kv_bytes_per_token, kv_dtype  # noqa: E402


def warmup_progress(done: int, total: int) -> None:
    """Engine.warmup()'s progress on stderr, about every tenth of the shapes (a warm-up can take minutes)."""
    if done % max(1, total // 10) == 0 or done == total:
        print(f"  warm-up: {done}/{total} step shapes compiled", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="the engines' context and the workload's longest sequence (default: the model's, at most "
                         "1024; Llama-3.1's 131072 would size every pool for 128k tokens)")  # fmt: skip
    ap.add_argument("--warmup", choices=["all", "replay"], default="all",
                    help="all: Engine.warmup() compiles every step shape first; replay: only the untimed replay of "
                         "the same workload compiles (the shapes the timed offline run meets; large models)")  # fmt: skip
    ap.add_argument("--hf-requests", type=int, default=64, help="0 skips Hugging Face")
    ap.add_argument("--skip-static", action="store_true")
    ap.add_argument("--skip-memory-matched", action="store_true", help="only the paged run at --batch")
    ap.add_argument(
        "--fixed-lengths",
        default=None,
        metavar="PROMPT,OUTPUT",
        help="all requests this long instead of the log-normal mix (few compiled shapes: large models)",
    )
    ap.add_argument("--decode-steps", default=str(GENERATE_DECODE_STEPS),
                    help="decode steps per device call (Engine(decode_steps=...); default: jkv.generate's); a comma "
                         "list times each at --batch (the first also runs the memory-matched row)")  # fmt: skip
    ap.add_argument(
        "--single-step-row",
        action="store_true",
        help="also time the paged engine at --batch with one decode step per device call",
    )
    ap.add_argument(
        "--unfused-row",
        action="store_true",
        help="also time the paged engine at --batch with the K/V scatter outside the decode kernel",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--trace-dir", default="bench_generate_trace", help="where the idle-share traces go (GPU)"
    )
    ap.add_argument("--no-idle-probe", action="store_true", help="skip the traced GPU idle-share estimate")
    ap.add_argument("--arrival-rate", default=None, metavar="REQ_PER_S",
                    help="also serve each paged row's workload online: Poisson arrivals at this rate (a comma list "
                         "for several), latency percentiles from each request's arrival")  # fmt: skip
    args = ap.parse_args()
    try:
        rates = [float(v) for v in args.arrival_rate.split(",")] if args.arrival_rate else []
    except ValueError:
        rates = [0.0]
    if any(r <= 0 for r in rates):
        raise SystemExit(
            f"--arrival-rate {args.arrival_rate}: give positive requests per second, e.g. 60 or 60,120."
        )
    ks = [int(v) for v in str(args.decode_steps).split(",")]
    if any(v < 1 for v in ks):
        raise SystemExit(f"--decode-steps {args.decode_steps}: give positive integers, e.g. 8 or 8,16.")
    fixed = tuple(int(x) for x in args.fixed_lengths.split(",")) if args.fixed_lengths else None

    import warnings

    warnings.filterwarnings("ignore", message=".*random.*")
    model = jkv.load_model(args.model, dtype="bfloat16")
    max_len = min(model.config.n_positions, args.max_seq_len or 1024)
    if args.warmup == "replay" and rates:
        raise SystemExit("--arrival-rate needs --warmup all: online arrivals make shapes an offline replay does not.")
    cfg = model.config.replace(n_positions=max_len)  # the context the engines and the workload use
    try:
        check_correct(model, args.block_size)
    except CheckFailed as err:
        raise SystemExit(str(err)) from None
    print(
        f"correctness: paged engine == dense reference (greedy, float32 copy) on {jax.devices()[0].device_kind}"
    )
    reqs = request_set(cfg, args.requests, fixed)  # --fixed-lengths: few step shapes, one full batch
    # NOTE: each engine first compiles every step shape it can meet (Engine.warmup), then replays the timed
    # workload untimed (prefix caching is off, so nothing is reused). Before warmup() existed, a replay alone left
    # shapes that online arrivals make uncompiled (H100, 2026-11-27: 1-2 compiles inside a timed online pass
    # after five untimed ones, time to first token 1-3.4 s p50).
    warm = reqs
    out_tokens = sum(o for _, o in reqs)
    per_tok = kv_bytes_per_token(cfg, kv_dtype("bfloat16"))
    bs = args.block_size
    static_kv = args.batch * cfg.n_positions * per_tok  # what a static batch of full-length sequences reserves
    rows = []

    # paged, batch cap = --batch (pool big enough that the cap binds)
    blocks = pool_blocks(cfg, args.batch, bs)
    k = ks[0]
    configs = [(f"jkv paged, batch {args.batch}, {v} decode steps/call", args.batch, True, v) for v in ks]
    if args.single_step_row and 1 not in ks:
        configs.append((f"jkv paged, batch {args.batch}, 1 decode step/call", args.batch, True, 1))
    if args.unfused_row:
        configs.append(
            (f"jkv paged, batch {args.batch}, K/V scatter outside the kernel", args.batch, False, k)
        )
    if not args.skip_memory_matched:
        configs.append(
            (f"jkv paged, static's KV memory ({static_kv / 2**30:.2f} GiB)", 4 * args.batch, True, k)
        )
    for name, cap, fused, ksteps in configs:
        eng = paged_engine(model, max_num_seqs=cap, num_blocks=blocks, block_size=bs, decode_steps=ksteps,
                           history=True, fused_write=fused, max_seq_len=max_len)  # fmt: skip
        # every step shape compiled before anything is timed (online included), or with --warmup replay only the
        # shapes the replay below meets
        warmed = (eng.warmup(greedy=True, progress=warmup_progress) if args.warmup == "all"
                  else {"shapes": 0, "seconds": 0.0})  # fmt: skip
        drive(eng, warm)
        eng.history.clear()
        wall, steps, drows, dsteps, final, _ = drive(eng, reqs)
        hist = eng.history
        frag = float(np.mean([h["internal_fragmentation"] for h in hist if h["blocks_used"]]))
        # engine steps (rounds) at the full batch: their time per decode step (a multi-step round's time / its
        # steps; a mean, since rounds of K steps and rounds of one step mix)
        full = [(t, n) for t, r, n in zip(steps, drows, dsteps) if r == cap and n]
        row = {"name": name, "wall_s": wall, "tokens": out_tokens, "tok_s": out_tokens / wall,
               "ms_per_token": 1e3 * wall / out_tokens, "kv_bytes": StepProbe(eng).pool_bytes, "kv_waste": frag,
               "peak_bytes": peak_bytes(), "preemptions": eng.stats().preemptions_recompute, "decode_steps": ksteps,
               "warmup_shapes": warmed["shapes"], "warmup_s": warmed["seconds"]}  # fmt: skip
        row |= latency_stats(final)
        row["online"] = []
        for rate in rates:  # the same engine (its shapes compiled) serves the workload again, online
            arrivals = poisson_arrivals(len(reqs), rate)  # warmup() compiled every shape arrivals can make
            row["online"].append(drive_online(eng, reqs, arrivals) | {"arrival_rate": rate})
        if cap == args.batch and full:
            dev = time_decode_step(eng, cap, min(512, max_len))  # ctx 512 unless the context is shorter
            if (
                ksteps == 1
            ):  # a multi-step run's rounds overlap each other and the prefill calls: not separable
                row["decode_step_ms_wall"] = 1e3 * sum(t for t, _ in full) / sum(n for _, n in full)
            row["decode_step_ms_device_ctx512"] = 1e3 * dev
            if jax.default_backend() == "gpu" and fused and not args.no_idle_probe:
                trace = str(Path(args.trace_dir).resolve() / f"b{cap}_k{ksteps}")
                row |= run_idle_probe(args.model, args.requests, cap, bs, ksteps, trace, fixed)
        rows.append(row)
        print(json.dumps(row), flush=True)
        eng = None

    if not args.skip_static:
        static_padded(model, warm, args.batch)
        wall, useful, waste = static_padded(model, reqs, args.batch)
        rows.append({"name": f"jkv static padded, batch {args.batch}", "wall_s": wall, "tokens": useful,
                     "tok_s": useful / wall, "ms_per_token": 1e3 * wall / useful, "kv_bytes": static_kv,
                     "kv_waste": waste, "peak_bytes": peak_bytes()})  # fmt: skip

    if args.hf_requests:
        try:
            sub = reqs[: args.hf_requests]
            wall, useful, peak = hf_generate(sub, args.batch, model.config)
            rows.append({"name": f"HF generate(), batch {args.batch} ({len(sub)} requests)", "wall_s": wall,
                         "tokens": useful, "tok_s": useful / wall, "ms_per_token": 1e3 * wall / useful,
                         "kv_bytes": None, "kv_waste": None, "peak_bytes": peak})  # fmt: skip
        except ImportError as err:
            print(f"Hugging Face skipped: {err}")

    meta = {"model": cfg.name, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "requests": args.requests, "output_tokens": out_tokens, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(json.dumps(meta))
    print(
        f"{'configuration':58s} {'tok/s':>9s} {'ms/tok':>7s} {'KV GiB':>7s} {'KV waste':>8s} {'peak GiB':>8s}"
    )
    for r in rows:
        kv = f"{r['kv_bytes'] / 2**30:.2f}" if r["kv_bytes"] else "-"
        waste = f"{100 * r['kv_waste']:.1f}%" if r["kv_waste"] is not None else "-"
        print(f"{r['name']:58s} {r['tok_s']:9.0f} {r['ms_per_token']:7.3f} {kv:>7s} {waste:>8s} "
              f"{r['peak_bytes'] / 2**30:8.2f}")  # fmt: skip
        if "decode_step_ms_device_ctx512" in r:
            wall = (f"{r['decode_step_ms_wall']:.3f} ms per decode step (mean over full-batch rounds)"
                    if "decode_step_ms_wall" in r else "not separable for multi-step rounds")  # fmt: skip
            print(f"    decode step at the full batch: {wall}; "
                  f"{r['decode_step_ms_device_ctx512']:.3f} ms for one synchronous step at ctx 512")  # fmt: skip
        if "warmup_s" in r:
            print(
                f"    warm-up: {r['warmup_shapes']} step shapes compiled in {r['warmup_s']:.1f} s (Engine.warmup)"
            )
        if "ttft_ms_p50" in r:
            print(f"    latency: time per output token p50 / p90 / p99 {r['tpot_ms_p50']:.2f} / {r['tpot_ms_p90']:.2f} / "
                  f"{r['tpot_ms_p99']:.2f} ms; time to first token p50 / p99 {r['ttft_ms_p50']:.0f} / "
                  f"{r['ttft_ms_p99']:.0f} ms (all requests queued at the start)")  # fmt: skip
        for o in r.get("online", []):
            print(f"    online, {o['arrival_rate']:g} req/s Poisson: {o['online_tok_s']:.0f} tok/s; time to first token "
                  f"p50 / p99 {o['online_ttft_ms_p50']:.1f} / {o['online_ttft_ms_p99']:.1f} ms; time per output "
                  f"token p50 / p99 {o['online_tpot_ms_p50']:.2f} / {o['online_tpot_ms_p99']:.2f} ms"
                  + (f" ({o['online_compiles_during_run']} compiles inside)" if o["online_compiles_during_run"]
                     else ""))  # fmt: skip
        if "gpu_idle_share" in r:
            print(f"    engine loop, middle half of {args.batch * 4} requests ({r['idle_window_mean_decode_rows']:.1f} "
                  f"decode rows per step on average): GPU busy {r['gpu_busy_ms_per_step']:.3f} "
                  f"ms of {r['engine_wall_ms_per_step']:.3f} ms wall per decode step -> GPU idle "
                  f"{100 * r['gpu_idle_share']:.1f}% ({100 * r['gpu_idle_share_traced']:.1f}% while traced)")  # fmt: skip
        elif "idle_probe_error" in r:
            print(f"    GPU idle probe failed: {r['idle_probe_error']}")


if __name__ == "__main__":
    main()
