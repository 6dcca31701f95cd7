#!/usr/bin/env python
"""End-to-end generation throughput on one card: jkv paged vs static padded batching vs Hugging Face generate().

    python scripts/bench_generate.py --model gpt2 --requests 256 --batch 32 [--hf-requests 64] [--out FILE]

Workload: a seeded synthetic set of requests with log-normal prompt and output lengths (prompt + output <= the
context), EOS ignored, random weights of the named GPT-2 size in bfloat16. In one run:

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
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jkv  # noqa: E402
from jkv.reference import reference_generate  # noqa: E402
from planner.kv_layout import kv_bytes_per_token, kv_dtype  # noqa: E402


def workload(n: int, seed: int, max_len: int, vocab: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) pairs: log-normal lengths, median 128 each, prompts <= max_len/4 and outputs
    <= max_len/2, so a static batch (longest prompt + longest output) always fits the context."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(np.clip(rng.lognormal(math.log(128), 0.8), 8, max_len // 4))
        o = int(np.clip(rng.lognormal(math.log(128), 0.8), 8, max_len // 2))
        out.append((rng.integers(0, vocab, p).tolist(), o))
    return out


def peak_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("peak_bytes_in_use", 0))


def run_paged(model, *, max_num_seqs, num_blocks, block_size, decode_steps, history=False, fused_write=True):
    eng = jkv.Engine(model, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=2048, enable_prefix_caching=False, decode_steps=decode_steps,
                     record_history=history)  # fmt: skip
    eng.runner.fuse_decode_write = fused_write  # False: the K/V scatter before the decode kernel (the old step)
    return eng


def drive(eng, reqs, window: tuple[int, int] | None = None, trace: str | None = None):
    """Run the workload to the end. `window=(first, last)`: the device is settled (idle) before engine step
    `first` and after step `last - 1`, and the wall time between is returned (with `trace`, a jax.profiler trace
    of exactly that stretch goes there). Returns (wall s, per-step wall s, decode rows and decode steps per step,
    final outputs, window wall s or None)."""
    for prompt, out_len in reqs:
        eng.add_request(prompt, jkv.SamplingParams(max_tokens=out_len, ignore_eos=True))
    step_times, decode_rows, decode_steps, final = [], [], [], {}
    t0 = time.perf_counter()
    i, w0, window_wall = 0, 0.0, None
    while eng.has_unfinished():
        if window and i == window[0]:
            eng.synchronize()  # the window starts on an idle device and holds whole steps
            if trace:
                jax.profiler.start_trace(trace)
            w0 = time.perf_counter()
        s0 = time.perf_counter()
        for out in eng.step(finished_only=True):
            if out.finished:
                final[out.request_id] = out
        step_times.append(time.perf_counter() - s0)
        decode_rows.append(eng.last_decode_rows)
        decode_steps.append(eng.last_decode_steps)
        i += 1
        if window and i == window[1]:
            eng.synchronize()
            window_wall = time.perf_counter() - w0
            if trace:
                jax.profiler.stop_trace()
    wall = time.perf_counter() - t0
    return wall, step_times, decode_rows, decode_steps, final, window_wall


def drive_online(eng, reqs, arrivals) -> dict:
    """Serve `reqs` as they arrive: request i is added once `arrivals[i]` seconds have passed (an open loop: late
    adds do not delay later arrivals). Latency counts from each request's scheduled arrival, so a host busy in
    `step()` when a request was due shows up in its time to first token. Returns tok/s and latency percentiles."""
    t0 = time.monotonic()
    due = [t0 + a for a in arrivals]
    final, nxt, compiled = {}, 0, len(eng.runner.compiled)
    ids = {}
    while nxt < len(reqs) or eng.has_unfinished():
        now = time.monotonic()
        while nxt < len(reqs) and due[nxt] <= now:
            prompt, out_len = reqs[nxt]
            ids[eng.add_request(prompt, jkv.SamplingParams(max_tokens=out_len, ignore_eos=True))] = due[nxt]
            nxt += 1
        if not eng.has_unfinished():
            time.sleep(max(0.0, due[nxt] - time.monotonic()))
            continue
        for out in eng.step(finished_only=True):
            if out.finished:
                final[out.request_id] = out
    wall = time.monotonic() - t0
    return {"online_tok_s": sum(o for _, o in reqs) / wall,
            "online_compiles_during_run": len(eng.runner.compiled) - compiled,
            **{f"online_{k}": v for k, v in latency_stats(final, ids).items()}}  # fmt: skip


def poisson_arrivals(n: int, rate: float, seed: int = 1) -> list[float]:
    """Arrival offsets (s) of n requests at `rate` per second, exponential gaps, seeded."""
    return np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n)).tolist()


def latency_stats(final: dict, arrivals: dict | None = None) -> dict:
    """Percentiles (ms) of time to first token and of mean time per output token over finished requests.
    Time to first token counts from `arrivals[request_id]` when given (online: the scheduled arrival), else from
    `add_request` (an offline batch queues every request at the start, so it includes queueing)."""
    ms = lambda vals, q: 1e3 * float(np.percentile([v for v in vals if v is not None], q))  # noqa: E731
    ttft = [o.metrics.first_token_time - arrivals[rid] if arrivals else o.metrics.time_to_first_token
            for rid, o in final.items()]  # fmt: skip
    tpot = [o.metrics.time_per_output_token for o in final.values()]
    return {"ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99), "tpot_ms_p50": ms(tpot, 50),
            "tpot_ms_p90": ms(tpot, 90), "tpot_ms_p99": ms(tpot, 99)}  # fmt: skip


def idle_probe(model, reqs, cap, blocks, bs, decode_steps, trace_dir: str) -> dict:
    """GPU idle share of the engine's own loop. The workload's first 4 x cap requests run three times, each on a
    fresh engine with the same schedule: once to compile, once timed, once traced. Over the middle half of the
    engine steps (the device settled before and after, in both runs): busy = union of the traced kernel
    intervals, wall = the untraced run's wall time over the same steps; idle = 1 - busy / wall. (Tracing slows
    the host's launches, so the traced span's idle share is larger; it is reported too.)

    Runs in a child process (`--idle-probe`), so a crash costs only this estimate: tracing multi-step rounds
    crashed the process with CUDA_ERROR_LAUNCH_FAILED on an H200 (2026-11-27), once seen in XLA's autotuner
    compiling inside a trace; this probe traces only after a compiling pass, on a synchronized device."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from profile_step import busy_ns, kernel_events, span_ns

    sub = reqs[: 4 * cap]
    make = lambda: run_paged(model, max_num_seqs=cap, num_blocks=blocks, block_size=bs, decode_steps=decode_steps)  # noqa: E731
    n_steps = len(drive(make(), sub)[1])
    window = (n_steps // 4, 3 * n_steps // 4)
    _, _, rows, steps, _, wall = drive(make(), sub, window)
    _, _, rows_t, steps_t, _, _ = drive(make(), sub, window, trace=trace_dir)
    if (rows_t, steps_t) != (rows, steps):
        return {"idle_probe_error": "the traced run scheduled differently from the timed one"}
    events = kernel_events(Path(trace_dir))
    if not events:
        return {"idle_probe_error": "no kernel events in the trace"}
    n = sum(steps[window[0] : window[1]])
    busy, span = busy_ns(events) / 1e9, span_ns(events) / 1e9
    w_rows, w_steps = np.array(rows[window[0] : window[1]]), np.array(steps[window[0] : window[1]])
    return {"idle_window_decode_steps": n, "idle_window_full_batch_share": float((w_rows == cap).mean()),
            "idle_window_mean_decode_rows": float((w_rows * w_steps).sum() / n),
            "gpu_busy_ms_per_step": 1e3 * busy / n, "engine_wall_ms_per_step": 1e3 * wall / n,
            "gpu_span_ms_per_step_traced": 1e3 * span / n, "gpu_idle_share_traced": 1 - busy / span,
            "gpu_idle_share": 1 - busy / wall}  # fmt: skip


def run_idle_probe(args, cap, decode_steps, trace_dir: str) -> dict:
    """idle_probe in a child process that does not preallocate GPU memory (this process holds most of it)."""
    import os
    import subprocess

    cmd = [sys.executable, __file__, "--model", args.model, "--requests", str(args.requests), "--batch", str(cap),
           "--block-size", str(args.block_size), "--idle-probe", str(decode_steps), "--trace-dir", trace_dir]  # fmt: skip
    if args.fixed_lengths:
        cmd += ["--fixed-lengths", args.fixed_lengths]
    env = os.environ | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"idle_probe_error": "timed out"}
    for line in done.stdout.splitlines():
        if line.startswith("IDLE_PROBE "):
            return json.loads(line[len("IDLE_PROBE ") :])
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"idle_probe_error": f"the probe process exited with {done.returncode}: {tail[:300]}"}


def time_decode_step(eng, rows: int, context: int, iters: int = 50) -> float:
    """Median device time of one decode step of `rows` sequences at `context` tokens (the engine's own jit)."""
    from jkv.runner import bucket, build_inputs

    bs = eng.block_size
    per = math.ceil(context / bs)
    need = rows * per + 1
    assert need <= eng.manager.num_blocks, "pool too small for the timing shape"
    table = lambda r: list(range(1 + r * per, 1 + (r + 1) * per))  # noqa: E731
    x = build_inputs([([1], context - 1, table(r), 0.0, 0, 1.0, 0, 0) for r in range(rows)], block_size=bs, chunk=1,
                     width=bucket(per), batch=bucket(rows))  # fmt: skip
    times = []
    for i in range(iters + 5):
        t0 = time.perf_counter()
        toks, _, eng.pools = eng.runner.run(eng.pools, x, decode=True, greedy=True)
        toks.block_until_ready()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def static_padded(model, reqs, batch):
    """Arrival-order batches padded to the longest prompt, each run for its longest output (dense cache)."""
    t0 = time.perf_counter()
    useful = 0
    reserved = used = 0
    for i in range(0, len(reqs), batch):
        chunk = reqs[i : i + batch]
        longest = max(o for _, o in chunk)
        reference_generate(model, [p for p, _ in chunk], max_tokens=longest)
        useful += sum(o for _, o in chunk)
        s_max = max(len(p) for p, _ in chunk) + longest
        reserved += len(chunk) * s_max
        used += sum(len(p) + o for p, o in chunk)
    jax.effects_barrier()
    return time.perf_counter() - t0, useful, 1 - used / reserved


def hf_generate(reqs, batch, config, dtype="bfloat16"):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                     n_positions=config.n_positions, vocab_size=config.vocab_size)  # fmt: skip
    torch.manual_seed(0)
    m = GPT2LMHeadModel(cfg).to("cuda", dtype=getattr(torch, dtype)).eval()
    useful = 0

    def one(chunk):
        longest = max(o for _, o in chunk)
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):  # left padding, as decoder-only generation needs
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.no_grad():
            m.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=longest,
                       min_new_tokens=longest, do_sample=False, pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()

    one(reqs[:batch][:4])  # warm-up
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        one(reqs[i : i + batch])
        useful += sum(o for _, o in reqs[i : i + batch])
    return time.perf_counter() - t0, useful, torch.cuda.max_memory_allocated()


def check_correct(model, block_size):
    """Paged engine vs dense reference, greedy, on a float32 copy (bf16 ties could flip either way)."""
    f32 = jkv.Model(model.config, jax.tree.map(lambda a: a.astype(jnp.float32), model.params), jnp.float32)
    rng = np.random.default_rng(123)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (5, 40, 130)]
    ref = reference_generate(f32, prompts, max_tokens=16)
    outs = jkv.generate(f32, prompts, jkv.SamplingParams(max_tokens=16), num_blocks=64, block_size=block_size,
                        max_num_seqs=8)  # fmt: skip
    ok = [o.token_ids == r for o, r in zip(outs, ref)]
    if not all(ok):
        raise SystemExit(f"paged engine disagrees with the dense reference: {ok}")


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
    ap.add_argument("--hf-requests", type=int, default=64, help="0 skips Hugging Face")
    ap.add_argument("--skip-static", action="store_true")
    ap.add_argument("--skip-memory-matched", action="store_true", help="only the paged run at --batch")
    ap.add_argument("--fixed-lengths", default=None, metavar="PROMPT,OUTPUT",
                    help="all requests this long instead of the log-normal mix (few compiled shapes: large models)")
    ap.add_argument("--decode-steps", default=str(jkv.engine.GENERATE_DECODE_STEPS),
                    help="decode steps per device call (Engine(decode_steps=...); default: jkv.generate's); a comma "
                         "list times each at --batch (the first also runs the memory-matched row)")  # fmt: skip
    ap.add_argument("--single-step-row", action="store_true",
                    help="also time the paged engine at --batch with one decode step per device call")
    ap.add_argument("--unfused-row", action="store_true",
                    help="also time the paged engine at --batch with the K/V scatter outside the decode kernel")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--trace-dir", default="bench_generate_trace", help="where the idle-share traces go (GPU)")
    ap.add_argument("--no-idle-probe", action="store_true", help="skip the traced GPU idle-share estimate")
    ap.add_argument("--arrival-rate", default=None, metavar="REQ_PER_S",
                    help="also serve each paged row's workload online: Poisson arrivals at this rate (a comma list "
                         "for several), latency percentiles from each request's arrival")  # fmt: skip
    ap.add_argument("--idle-probe", type=int, default=None, metavar="K", help=argparse.SUPPRESS)  # the child's mode
    args = ap.parse_args()
    try:
        rates = [float(v) for v in args.arrival_rate.split(",")] if args.arrival_rate else []
    except ValueError:
        rates = [0.0]
    if any(r <= 0 for r in rates):
        raise SystemExit(f"--arrival-rate {args.arrival_rate}: give positive requests per second, e.g. 60 or 60,120.")

    import warnings

    warnings.filterwarnings("ignore", message=".*random.*")
    model = jkv.load_model(args.model, dtype="bfloat16")
    cfg = model.config
    if args.idle_probe is None:
        check_correct(model, args.block_size)
        print(f"correctness: paged engine == dense reference (greedy, float32 copy) on {jax.devices()[0].device_kind}")
    if args.fixed_lengths:  # every request the same prompt and output length: few step shapes, one full batch
        p_len, o_len = (int(x) for x in args.fixed_lengths.split(","))
        rng = np.random.default_rng(0)
        reqs = [(rng.integers(0, cfg.vocab_size, p_len).tolist(), o_len) for _ in range(args.requests)]
    else:
        reqs = workload(args.requests, 0, cfg.n_positions, cfg.vocab_size)
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
    blocks = args.batch * math.ceil(cfg.n_positions / bs) + 1
    if args.idle_probe is not None:
        probe = idle_probe(model, reqs, args.batch, blocks, bs, args.idle_probe, args.trace_dir)
        print("IDLE_PROBE " + json.dumps(probe), flush=True)
        return
    ks = [int(v) for v in str(args.decode_steps).split(",")]
    if any(v < 1 for v in ks):
        raise SystemExit(f"--decode-steps {args.decode_steps}: give positive integers, e.g. 8 or 8,16.")
    k = ks[0]
    configs = [(f"jkv paged, batch {args.batch}, {v} decode steps/call", args.batch, True, v) for v in ks]
    if args.single_step_row and 1 not in ks:
        configs.append((f"jkv paged, batch {args.batch}, 1 decode step/call", args.batch, True, 1))
    if args.unfused_row:
        configs.append((f"jkv paged, batch {args.batch}, K/V scatter outside the kernel", args.batch, False, k))
    if not args.skip_memory_matched:
        configs.append((f"jkv paged, static's KV memory ({static_kv / 2**30:.2f} GiB)", 4 * args.batch, True, k))
    for name, cap, fused, ksteps in configs:
        eng = run_paged(model, max_num_seqs=cap, num_blocks=blocks, block_size=bs, decode_steps=ksteps, history=True,
                        fused_write=fused)  # fmt: skip
        # every step shape compiled before anything is timed (online included)
        warmed = eng.warmup(greedy=True, progress=warmup_progress)
        drive(eng, warm)
        eng.history.clear()
        wall, steps, drows, dsteps, final, _ = drive(eng, reqs)
        hist = eng.history
        frag = float(np.mean([h["internal_fragmentation"] for h in hist if h["blocks_used"]]))
        # engine steps (rounds) at the full batch: their time per decode step (a multi-step round's time / its
        # steps; a mean, since rounds of K steps and rounds of one step mix)
        full = [(t, n) for t, r, n in zip(steps, drows, dsteps) if r == cap and n]
        row = {"name": name, "wall_s": wall, "tokens": out_tokens, "tok_s": out_tokens / wall,
               "ms_per_token": 1e3 * wall / out_tokens, "kv_bytes": eng.pools.nbytes, "kv_waste": frag,
               "peak_bytes": peak_bytes(), "preemptions": eng.stats().preemptions_recompute, "decode_steps": ksteps,
               "warmup_shapes": warmed["shapes"], "warmup_s": warmed["seconds"]}  # fmt: skip
        row |= latency_stats(final)
        row["online"] = []
        for rate in rates:  # the same engine (its shapes compiled) serves the workload again, online
            arrivals = poisson_arrivals(len(reqs), rate)  # warmup() compiled every shape arrivals can make
            row["online"].append(drive_online(eng, reqs, arrivals) | {"arrival_rate": rate})
        if cap == args.batch and full:
            dev = time_decode_step(eng, cap, 512)
            if ksteps == 1:  # a multi-step run's rounds overlap each other and the prefill calls: not separable
                row["decode_step_ms_wall"] = 1e3 * sum(t for t, _ in full) / sum(n for _, n in full)
            row["decode_step_ms_device_ctx512"] = 1e3 * dev
            if jax.default_backend() == "gpu" and fused and not args.no_idle_probe:
                row |= run_idle_probe(args, cap, ksteps, str(Path(args.trace_dir).resolve() / f"b{cap}_k{ksteps}"))
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
            wall, useful, peak = hf_generate(sub, args.batch, cfg)
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
    print(f"{'configuration':58s} {'tok/s':>9s} {'ms/tok':>7s} {'KV GiB':>7s} {'KV waste':>8s} {'peak GiB':>8s}")
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
            print(f"    warm-up: {r['warmup_shapes']} step shapes compiled in {r['warmup_s']:.1f} s (Engine.warmup)")
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
