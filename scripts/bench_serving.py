"""Benchmark `jkv serve` over real HTTP (streaming completions, EOS ignored, greedy, the seeded mixed workload of
bench_generate.py), against the same engine offline.

One phase against a running server:
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --model gpt2 --rate 20 --requests 200
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --model gpt2 --concurrency 32

The whole comparison in one run (starts the server itself; what docs/benchmarks.md reports):
    python scripts/bench_serving.py --suite --model gpt2 [--requests 600] [--out DIR] [engine flags as jkv serve's]

--suite: (1) the engine offline in two child processes, one after the other on one compile cache: as
`jkv.generate` runs it (no streamed text; its warm-up fills the cache), then as the server runs it
(`stream_text=True`, every step's outputs read): the saturated workload's output tok/s (every request queued at
once) and, one request at a time, its time to first token; (2) `jkv serve` with the same engine flags, loading the
cache: the saturated workload over HTTP (its req/s is the saturated rate R), a closed loop of max-num-seqs
clients, Poisson arrivals at 50 / 80 / 100 % of R, and one request at a time (the server's added latency: served
TTFT minus the engine's); (3) for each --also-server FLAGS (e.g. '--api-servers 4'), a further server with those
flags: saturated, closed loop and one at a time. XLA compilations while serving are read from the server's /metrics. Every phase is
bounded (--phase-timeout; the children and the server's start by --startup-timeout). With --out, the results
(JSON), the table (Markdown), the server's log and its last /metrics go there; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from jkv.bench import procfs
from jkv.bench.http_load import run_load_in_processes, summarize
from jkv.bench.serving import poisson_arrivals, workload

ENGINE_FLAGS = ("dtype", "hbm", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_seq_len", "decode_steps",
                "kv_dtype", "tokenizer")  # fmt: skip


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
    p.add_argument("--client-processes", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                   help="load-generator processes a phase's clients are spread over (one Python client parsing "
                   "every chunk can be slower than the server); one-at-a-time phases use one")
    p.add_argument("--engine-thread", action="store_true",
                   help="--suite: serve with `jkv serve --engine-thread` (the engine loop in a thread of the server; "
                        "default: the server's default, the engine loop in its own process)")  # fmt: skip
    p.add_argument("--api-servers", type=int, default=1, metavar="N",
                   help="--suite: serve with `jkv serve --api-servers N` (N HTTP front-end processes over the engine)")
    p.add_argument("--also-server", action="append", default=[], metavar="FLAGS",
                   help="--suite: after the phases, start a further server with these `jkv serve` flags added (e.g. "
                        "'--api-servers 4' or '--engine-thread') and run the saturated, closed-loop and "
                        "one-at-a-time phases against it too; repeatable; write a single flag as --also-server=--engine-thread")  # fmt: skip
    p.add_argument("--also-other-mode", action="store_true",
                   help="--suite: --also-server with the other engine mode (thread or process)")
    p.add_argument("--phase-timeout", type=float, default=120.0, help="seconds one load phase may take")
    p.add_argument("--startup-timeout", type=float, default=420.0,
                   help="seconds an offline child, or the server's start (warm-up included), may take")
    p.add_argument("--stream-text", action="store_true", help=argparse.SUPPRESS)  # the offline child: as served
    p.add_argument("--out", help="--suite: a directory for results.json, table.md, server.log and metrics.txt")
    p.add_argument("--compile-cache", default="/tmp/jkv-bench-serving-cache")
    p.add_argument("--json", help="write the results there")
    p.add_argument("--offline-results", help="--suite: results.json of an earlier run (its offline half is reused)")
    e = p.add_argument_group("engine (the server's and the offline run's)")
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--hbm")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-seqs", type=int, default=64)
    e.add_argument("--max-num-batched-tokens", type=int, default=512)
    e.add_argument("--max-seq-len", type=int, default=512)
    e.add_argument("--decode-steps", type=int, default=8)
    e.add_argument("--kv-dtype")
    e.add_argument("--tokenizer", help="a tokenizer directory for the server and the offline run (jkv serve "
                                       "--tokenizer)")  # fmt: skip
    p.add_argument("--word-tokenizer", action="store_true",
                   help="--suite for a model without tokenizer files (e.g. the llama-3.1-8b preset): write a "
                        "tokenizer of one word per id under --compile-cache and serve with it")  # fmt: skip
    return p.parse_args()


def engine_flags(args) -> list[str]:
    out = []
    for name in ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def phase(args, url: str, reqs, processes: int | None = None, server_pid: int | None = None, **how) -> dict:
    """One load phase, its clients spread over --client-processes processes (or `processes`). With server_pid:
    also each server process's CPU seconds over the phase's wall seconds (cores busy), by role."""
    n = args.client_processes if processes is None else processes
    roles = server_roles(server_pid) if server_pid else {}
    before = {role: [procfs.cpu_seconds(pid) for pid in pids] for role, pids in roles.items()}
    timings, wall = run_load_in_processes(url, args.model, reqs, deadline_s=args.phase_timeout, processes=n, **how)
    out = summarize(timings, wall, slo_ttft_s=args.slo_ttft_ms / 1e3, slo_tpot_s=args.slo_tpot_ms / 1e3)
    if roles and wall > 0:
        out["cpu_cores_busy"] = {role: [round((procfs.cpu_seconds(pid) - b) / wall, 2) for pid, b in zip(pids, before[role])]
                                 for role, pids in roles.items()}  # fmt: skip
    return out | {"client_processes": n}


def server_roles(pid: int) -> dict[str, list[int]]:
    """A `jkv serve` process tree by role: with --api-servers N, the supervisor, its N front ends (each leads
    its own process group) and the engine process; else the server (its front end) and the engine process, if
    it has one. multiprocessing's resource tracker is left out."""
    kids = [k for k in procfs.children(pid) if "resource_tracker" not in procfs.cmdline(k)]
    front_ends = [k for k in kids if procfs.process_group(k) == k]
    engine = [k for k in kids if k not in front_ends]
    if front_ends:
        return {"supervisor": [pid], "front ends": front_ends, "engine process": engine}
    return {"server": [pid], "engine process": engine}


def offline(args) -> dict:
    """The engine alone (this process owns the device): saturated tok/s and one-at-a-time TTFT. --stream-text: the
    engine as the server runs it, also stepped reading every output (the server's engine thread does)."""
    import numpy as np

    import jkv
    from jkv.bench.serving import drive

    from jkv.tokenizer import get_tokenizer

    model = jkv.load_model(args.model, dtype=args.dtype)
    eng = jkv.Engine(model, hbm=args.hbm, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens, max_seq_len=args.max_seq_len,
                     decode_steps=args.decode_steps, kv_dtype=args.kv_dtype, compile_cache_dir=args.compile_cache,
                     stream_text=args.stream_text,
                     tokenizer=get_tokenizer(args.tokenizer) if args.tokenizer else None)  # fmt: skip
    t0 = time.perf_counter()
    info = eng.warmup()
    warm_s = time.perf_counter() - t0
    reqs = workload(args.requests, args.seed, args.max_len, args.vocab)
    tokens = sum(o for _, o in reqs)
    drive(eng, reqs[:64])  # a first pass settles anything warm-up left (host caches, allocator)
    run = drive(eng, reqs)
    out = {"tok_s": tokens / run.wall, "wall_s": run.wall, "warmup_s": warm_s, "warmup_shapes": info["shapes"],
           "warmup_loaded": info["loaded"], "num_blocks": eng.stats().blocks_total}  # fmt: skip
    if args.stream_text:  # every step's outputs, as the server's engine thread reads them
        for prompt, out_len in reqs:
            eng.add_request(prompt, jkv.SamplingParams(max_tokens=out_len, ignore_eos=True))
        t0 = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        out["every_output_tok_s"] = tokens / (time.perf_counter() - t0)
    ttfts = []
    for prompt, out_len in reqs[: args.low_load_requests]:
        rid = eng.add_request(prompt, jkv.SamplingParams(max_tokens=out_len, ignore_eos=True))
        first = None
        while eng.has_unfinished():
            for o in eng.step():
                if o.request_id == rid and first is None and o.token_ids:
                    first = o.metrics.time_to_first_token
        ttfts.append(first)
    out["ttft_ms_p50"] = 1e3 * float(np.percentile(ttfts, 50))
    out["ttft_ms_p99"] = 1e3 * float(np.percentile(ttfts, 99))
    out["compilations"] = eng.stats().compilations
    return out


def run_offline_child(args, stream_text: bool) -> dict:
    cmd = [sys.executable, __file__, "--offline", "--model", args.model, "--requests", str(args.requests),
           "--low-load-requests", str(args.low_load_requests), "--seed", str(args.seed), "--max-len",
           str(args.max_len), "--vocab", str(args.vocab), "--compile-cache", args.compile_cache, *engine_flags(args)]  # fmt: skip
    if stream_text:
        cmd.append("--stream-text")
    child = subprocess.run(cmd, capture_output=True, text=True, timeout=args.startup_timeout, check=False)
    if child.returncode != 0:
        raise SystemExit(f"the offline run failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def suite(args) -> dict:
    from jkv.serve.process import ServerProcess

    if args.offline_results:
        with open(args.offline_results) as f:
            earlier = json.load(f)
        results = {k: earlier[k] for k in ("offline", "offline_streamed")} | {"offline_from_earlier_run": True}
    else:
        results = {"offline": run_offline_child(args, False)}
        print(f"offline: {results['offline']}", flush=True)
        save(args, results)
        results["offline_streamed"] = run_offline_child(args, True)
        print(f"offline, as served: {results['offline_streamed']}", flush=True)
        save(args, results)
    reqs = workload(args.requests, args.seed, args.max_len, args.vocab)
    flags = ["--model", args.model, "--served-model-name", args.model, "--compile-cache", args.compile_cache,
             "--max-waiting", str(10 * args.requests), "--log-level", "warning", *engine_flags(args)]  # fmt: skip
    t0 = time.perf_counter()
    mode, other_mode = ("--engine-thread", "--engine-process") if args.engine_thread else ("--engine-process",
                                                                                          "--engine-thread")  # fmt: skip
    if args.api_servers > 1:
        mode += f" --api-servers {args.api_servers}"
    with ServerProcess(flags + mode.split(), startup_timeout=args.startup_timeout) as server:
        results["server_ready_s"] = time.perf_counter() - t0
        results["server_warmup"] = next((ln.strip() for ln in server.lines if "warm-up:" in ln), None)
        settle = reqs[:64]
        phase(args, server.url, settle, arrivals=[0.0] * len(settle))  # settle, as offline
        before = scrape(server.url)
        sat = phase(args, server.url, reqs, server_pid=server.proc.pid, arrivals=[0.0] * len(reqs))
        results["saturated"] = sat
        save(args, results)
        if args.client_processes > 1:  # the same load from one client process: what the client alone limits
            results["saturated_one_client_process"] = phase(args, server.url, reqs, 1, arrivals=[0.0] * len(reqs))
        results["closed_loop"] = phase(args, server.url, reqs, concurrency=args.max_num_seqs)
        rate = sat["req_s"]
        for frac in (0.5, 0.8, 1.0):
            arrivals = poisson_arrivals(len(reqs), frac * rate, seed=args.seed + 1)
            results[f"poisson_{int(frac * 100)}pct"] = phase(args, server.url, reqs, arrivals=arrivals) | {
                "rate_req_s": frac * rate}
            save(args, results)
        results["low_load"] = phase(args, server.url, reqs[: args.low_load_requests], 1, concurrency=1)
        after = scrape(server.url)
        results["compilations_while_serving"] = after.get("jkv:xla_compilations_total", 0) - before.get(
            "jkv:xla_compilations_total", 0)
        if args.out:
            metrics_text = "\n".join(f"{k} {v}" for k, v in after.items())
            write(args.out, "metrics.txt", metrics_text)
    if args.out:
        write(args.out, "server.log", server.output)
    results["engine_mode"] = mode
    results["further_servers"] = []
    for i, extra in enumerate(args.also_server + ([other_mode] if args.also_other_mode else [])):
        keep_engine_mode = [] if "--engine-" in extra else mode.split()[:1]  # extra flags name the mode or keep ours
        extra_mode = " ".join(keep_engine_mode + extra.split())
        with ServerProcess(flags + extra_mode.split(), startup_timeout=args.startup_timeout) as server:
            phase(args, server.url, reqs[:64], arrivals=[0.0] * 64)  # settle
            further = {"saturated": phase(args, server.url, reqs, server_pid=server.proc.pid, arrivals=[0.0] * len(reqs)),
                       "closed_loop": phase(args, server.url, reqs, concurrency=args.max_num_seqs),
                       "low_load": phase(args, server.url, reqs[: args.low_load_requests], 1, concurrency=1)}  # fmt: skip
        results["further_servers"].append(further | {"engine_mode": extra_mode})
        save(args, results)
        if args.out:
            write(args.out, f"server_further_{i}.log", server.output)
    results["served_over_offline"] = sat["output_tok_s"] / results["offline"]["tok_s"]
    results["server_added_ttft_ms_p50"] = results["low_load"]["ttft_ms_p50"] - results["offline_streamed"]["ttft_ms_p50"]
    return results


def table(r: dict) -> str:
    off, st, sat = r["offline"], r["offline_streamed"], r["saturated"]
    rows = [
        ("engine offline (jkv.generate's way: no streamed text), output tok/s", f"{off['tok_s']:,.0f}"),
        ("engine offline as served (stream_text, every output read), output tok/s",
         f"{st['tok_s']:,.0f} / {st['every_output_tok_s']:,.0f}"),
        ("served at saturation (all requests at t = 0), output tok/s", f"{sat['output_tok_s']:,.0f}"),
        ("served / engine offline (target >= 90 %)", f"{100 * r['served_over_offline']:.0f} %"),
        ("load-generator processes (the saturated and later phases)", str(sat.get("client_processes", 1))),
    ]
    rows.append(("the server's engine mode", r.get("engine_mode", "--engine-process")))
    if "cpu_cores_busy" in sat:
        rows.append(("saturated: CPU cores busy per server process", cpu_text(sat["cpu_cores_busy"])))
    further = r.get("further_servers", []) + ([r["other_mode_server"]] if "other_mode_server" in r else [])
    for e in further:
        m = e["engine_mode"]
        if "cpu_cores_busy" in e["saturated"]:
            rows.append((f"{m}: saturated, CPU cores busy per server process", cpu_text(e["saturated"]["cpu_cores_busy"])))
        rows += [(f"{m}: served at saturation, output tok/s (/ engine offline)",
                  f"{e['saturated']['output_tok_s']:,.0f} ({100 * e['saturated']['output_tok_s'] / off['tok_s']:.0f} %)"),
                 (f"{m}: closed loop of max-num-seqs clients, output tok/s",
                  f"{e['closed_loop']['output_tok_s']:,.0f}"),
                 (f"{m}: one request at a time, served TTFT p50 / p99 ms",
                  f"{e['low_load']['ttft_ms_p50']:.2f} / {e['low_load']['ttft_ms_p99']:.2f}")]  # fmt: skip
    if "saturated_one_client_process" in r:
        rows.append(("served at saturation from one load-generator process, output tok/s",
                     f"{r['saturated_one_client_process']['output_tok_s']:,.0f}"))  # fmt: skip
    rows += [
        ("served, closed loop of max-num-seqs clients, output tok/s", f"{r['closed_loop']['output_tok_s']:,.0f}"),
    ]
    for pct in (50, 80, 100):
        p = r[f"poisson_{pct}pct"]
        what = f"Poisson at {pct} % of the saturated rate ({p['rate_req_s']:.0f} req/s): TTFT p50 / p99 ms, tok/s"
        rows.append((what, f"{p['ttft_ms_p50']:.1f} / {p['ttft_ms_p99']:.1f}, {p['output_tok_s']:,.0f}"))
    low = r["low_load"]
    rows += [
        ("one request at a time: served TTFT p50 / p99 ms", f"{low['ttft_ms_p50']:.2f} / {low['ttft_ms_p99']:.2f}"),
        ("one request at a time: engine TTFT p50 / p99 ms", f"{st['ttft_ms_p50']:.2f} / {st['ttft_ms_p99']:.2f}"),
        ("server's added latency (served - engine TTFT, p50) ms", f"{r['server_added_ttft_ms_p50']:.2f}"),
        ("server start to ready (warm-up from the offline run's executables) s", f"{r['server_ready_s']:.1f}"),
        ("XLA compilations while serving", f"{r['compilations_while_serving']:.0f}"),
        ("failed requests (all phases)", str(sum(v["failed"] for v in r.values() if isinstance(v, dict) and "failed" in v))),
    ]  # fmt: skip
    return "\n".join(["| what | value |", "| --- | ---: |", *(f"| {a} | {b} |" for a, b in rows)])


def cpu_text(busy: dict[str, list[float]]) -> str:
    return "; ".join(f"{role} {' / '.join(f'{c:.2f}' for c in cores)}" for role, cores in busy.items())


def save(args, results: dict) -> None:
    """What the suite has so far, in case a later phase does not finish."""
    if args.out:
        write(args.out, "results.json", json.dumps(results, indent=1))


def write(directory: str, name: str, text: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


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
        print(json.dumps(res, indent=1))
    else:
        if args.word_tokenizer and args.tokenizer is None:  # a preset without tokenizer files: words for its ids
            from planner import load_config

            from jkv.bench.serving import write_word_tokenizer

            args.tokenizer = str(write_word_tokenizer(Path(args.compile_cache) / "word_tokenizer",
                                                      load_config(args.model).vocab_size))  # fmt: skip
        res = suite(args)
        print(json.dumps(res, indent=1))
        text = table(res)
        if args.out:
            write(args.out, "results.json", json.dumps(res, indent=1))
            write(args.out, "table.md", text + "\n")
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
