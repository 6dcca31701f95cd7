"""Benchmark `jkv serve` over real HTTP (streaming completions, EOS ignored, the seeded mixed workload of
bench_generate.py), against the same engine offline.

One phase against a running server:
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --model gpt2 --rate 20 --requests 200
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --model gpt2 --concurrency 32

The whole comparison in one run (starts the server itself; what docs/benchmarks.md reports):
    python scripts/bench_serving.py --suite --model gpt2 [--requests 600] [engine flags as jkv serve's]

--suite: (1) the engine offline in a child process: the saturated workload's output tok/s (every request queued
at once) and, one request at a time, its time to first token; (2) `jkv serve` with the same engine flags: the
saturated workload over HTTP (its req/s is the saturated rate R), Poisson arrivals at 50 / 80 / 100 % of R, and
one request at a time (the server's added latency: served TTFT minus the engine's). Every phase is bounded
(--phase-timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

from jkv.bench.http_load import run_load, summarize
from jkv.bench.serving import poisson_arrivals, workload

ENGINE_FLAGS = ("dtype", "hbm", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_seq_len", "decode_steps",
                "kv_dtype")  # fmt: skip


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--url", help="a running server (one phase); without it, --suite")
    p.add_argument("--suite", action="store_true")
    p.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)  # the suite's child process
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--low-load-requests", type=int, default=20)
    p.add_argument("--rate", type=float, help="Poisson arrivals per second (one phase)")
    p.add_argument("--concurrency", type=int, help="closed loop: this many clients (one phase)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=512, help="workload: prompts <= max_len/4, outputs <= max_len/2")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--slo-ttft-ms", type=float, default=500.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--phase-timeout", type=float, default=240.0)
    p.add_argument("--compile-cache", default="/tmp/jkv-bench-serving-cache")
    p.add_argument("--json", help="write the results there")
    p.add_argument("--offline-results", help="--suite: the offline run's JSON from an earlier run (skips it)")
    e = p.add_argument_group("engine (the server's and the offline run's)")
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--hbm")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-seqs", type=int, default=64)
    e.add_argument("--max-num-batched-tokens", type=int, default=512)
    e.add_argument("--max-seq-len", type=int, default=512)
    e.add_argument("--decode-steps", type=int, default=8)
    e.add_argument("--kv-dtype")
    return p.parse_args()


def engine_flags(args) -> list[str]:
    out = []
    for name in ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def phase(args, url: str, reqs, **how) -> dict:
    timings, wall = asyncio.run(run_load(url, args.model, reqs, deadline_s=args.phase_timeout, **how))
    return summarize(timings, wall, slo_ttft_s=args.slo_ttft_ms / 1e3, slo_tpot_s=args.slo_tpot_ms / 1e3)


def offline(args) -> dict:
    """The engine alone (this process owns the device): saturated tok/s and one-at-a-time TTFT."""
    import numpy as np

    import jkv
    from jkv.bench.serving import drive

    model = jkv.load_model(args.model, dtype=args.dtype)
    eng = jkv.Engine(model, hbm=args.hbm, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens, max_seq_len=args.max_seq_len,
                     decode_steps=args.decode_steps, kv_dtype=args.kv_dtype, compile_cache_dir=args.compile_cache)  # fmt: skip
    t0 = time.perf_counter()
    eng.warmup()
    warm_s = time.perf_counter() - t0
    reqs = workload(args.requests, args.seed, args.max_len, args.vocab)
    drive(eng, reqs[:64])  # a first pass settles anything warm-up left (host caches, allocator)
    run = drive(eng, reqs)
    ttfts = []
    for prompt, out_len in reqs[: args.low_load_requests]:
        rid = eng.add_request(prompt, jkv.SamplingParams(max_tokens=out_len, ignore_eos=True))
        first = None
        while eng.has_unfinished():
            for out in eng.step():
                if out.request_id == rid and first is None and out.token_ids:
                    first = out.metrics.time_to_first_token
        ttfts.append(first)
    tokens = sum(o for _, o in reqs)
    return {"offline_tok_s": tokens / run.wall, "offline_wall_s": run.wall, "warmup_s": warm_s,
            "engine_ttft_ms_p50": 1e3 * float(np.percentile(ttfts, 50)),
            "engine_ttft_ms_p99": 1e3 * float(np.percentile(ttfts, 99))}  # fmt: skip


def suite(args) -> dict:
    from jkv.serve.process import ServerProcess

    cmd = [sys.executable, __file__, "--offline", "--model", args.model, "--requests", str(args.requests),
           "--low-load-requests", str(args.low_load_requests), "--seed", str(args.seed), "--max-len",
           str(args.max_len), "--vocab", str(args.vocab), "--compile-cache", args.compile_cache, *engine_flags(args)]  # fmt: skip
    if args.offline_results:
        results = json.loads(args.offline_results) | {"offline_from_earlier_run": True}
    else:
        child = subprocess.run(cmd, capture_output=True, text=True, timeout=args.phase_timeout * 2)
        if child.returncode != 0:
            raise SystemExit(f"the offline run failed:\n{child.stderr[-3000:]}")
        results = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"offline: {results}", flush=True)
    reqs = workload(args.requests, args.seed, args.max_len, args.vocab)
    flags = ["--model", args.model, "--served-model-name", args.model, "--compile-cache", args.compile_cache,
             "--max-waiting", str(10 * args.requests), "--log-level", "warning", *engine_flags(args)]  # fmt: skip
    t0 = time.perf_counter()
    with ServerProcess(flags, startup_timeout=args.phase_timeout * 2) as server:
        results["server_start_s"] = time.perf_counter() - t0
        phase(args, server.url, reqs[:64], arrivals=[0.0] * 64)  # settle, as offline
        sat = phase(args, server.url, reqs, arrivals=[0.0] * len(reqs))
        results["saturated"] = sat
        rate = sat["req_s"]
        for frac in (0.5, 0.8, 1.0):
            arrivals = poisson_arrivals(len(reqs), frac * rate, seed=args.seed + 1)
            results[f"poisson_{int(frac * 100)}pct"] = phase(args, server.url, reqs, arrivals=arrivals) | {
                "rate_req_s": frac * rate}
        low = phase(args, server.url, reqs[: args.low_load_requests], concurrency=1)
        results["low_load"] = low
    results["served_over_offline"] = sat["output_tok_s"] / results["offline_tok_s"]
    results["server_added_ttft_ms_p50"] = low["ttft_ms_p50"] - results["engine_ttft_ms_p50"]
    return results


def main() -> int:
    args = parse()
    if args.offline:
        print(json.dumps(offline(args)))
        return 0
    if args.url:
        reqs = workload(args.requests, args.seed, args.max_len, args.vocab)
        if args.rate:
            res = phase(args, args.url, reqs, arrivals=poisson_arrivals(len(reqs), args.rate, seed=args.seed + 1))
        else:
            res = phase(args, args.url, reqs, concurrency=args.concurrency or 1)
    else:
        res = suite(args)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
