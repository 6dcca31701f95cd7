#!/usr/bin/env python
"""Where the device time of one engine decode step goes: per-kernel GPU time from a jax.profiler trace.

    python scripts/profile_step.py --model gpt2 --rows 32 --context 512 [--kv-dtype int8] [--out DIR]

Builds a paged engine, one decode step of `rows` sequences at `context` tokens each (the engine's own jitted
step, as `scripts/bench_generate.py` times it), warms it up, then:

- times it: median wall time of a step with `block_until_ready` (dispatch + device);
- traces `--steps` steps with `jax.profiler` and sums the GPU kernel events per step, grouped by kernel name
  (the trace directory stays under --out for TensorBoard/Perfetto);
- reports the device busy time per step (union of kernel intervals), the GPU span per step when steps are
  dispatched back to back (what an engine that never waits on the host would see), the launch count, and the
  largest kernels;
- saves the optimized HLO and counts whole-pool copies in it (a copy of a pool-sized buffer inside the step
  would mean the in-place update failed);
- with --decode-steps K, the same for K steps per call (multi-step decode): wall per step, busy time, the
  untraced wall of calls dispatched back to back (the tracer's per-launch cost inflates the traced span, so idle
  is busy against this), the kernels of one step in launch order with the gaps between them, and with
  --dispatch-probe whether a call's dispatch waits for the previous call.

The largest kernel groups name what to optimize; the gap between wall and busy time is launch/dispatch cost.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jkv  # noqa: E402
from jkv.runner import bucket, build_inputs  # noqa: E402


def decode_inputs(eng, rows: int, context: int, steps: int = 1):
    """A decode step of `rows` sequences, each `context` tokens long, over disjoint blocks of the pool (with room
    for `steps` tokens each: a multi-step call's query_lens says `steps`)."""
    bs = eng.block_size
    per = math.ceil((context + steps - 1) / bs)
    if rows * per + 1 > eng.manager.num_blocks:
        raise SystemExit(f"the pool has {eng.manager.num_blocks} blocks; {rows} x {context} tokens need {rows * per + 1}.")
    table = lambda r: list(range(1 + r * per, 1 + (r + 1) * per))  # noqa: E731
    x = build_inputs([([1], context - 1, table(r), 0.0, 0, 1.0, 0, 0) for r in range(rows)], block_size=bs,
                     chunk=1, width=bucket(per), batch=bucket(rows))  # fmt: skip
    if steps > 1:
        x = type(x)(**{**x.__dict__, "query_lens": np.where(np.arange(x.tokens.shape[0]) < rows, steps, 0)})
    return x


def kernel_events(trace_dir: Path) -> list[tuple[str, int, int]]:
    """(name, start_ns, end_ns) of every event on the GPU planes of the newest trace under trace_dir."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(str(trace_dir / "**" / "*.xplane.pb"), recursive=True))
    if not files:
        raise SystemExit(f"no .xplane.pb under {trace_dir}: the trace was not written.")
    data = ProfileData.from_file(files[-1])
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # Kernel launches sit on the stream lines; skip XLA's op/module summary lines (they overlap them).
            if "stream" not in line.name.lower():
                continue
            out.extend((ev.name, ev.start_ns, ev.end_ns) for ev in line.events)
    return out


def busy_ns(events: list[tuple[str, int, int]]) -> int:
    """Length of the union of the events' intervals."""
    total, end = 0, -1
    for _, s, e in sorted(events, key=lambda x: x[1]):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def span_ns(events: list[tuple[str, int, int]]) -> int:
    """From the first event's start to the last one's end (0 without events)."""
    return max(e for _, _, e in events) - min(s for _, s, _ in events) if events else 0


def pool_copies(hlo: str, pool_shape) -> list[str]:
    """HLO lines that copy a pool-sized buffer (there should be none: the pools are updated in place)."""
    dims = ",".join(str(d) for d in pool_shape)
    return [ln.strip()[:160] for ln in hlo.splitlines() if re.search(r"= \S+\[" + dims + r"\]\S* copy\(", ln)]


def kernel_table(events: list[tuple[str, int, int]], steps: int) -> list[dict]:
    """Kernel time and launches per step, grouped by `short` name, largest first."""
    groups = defaultdict(lambda: [0, 0])
    for name, s, e in events:
        groups[short(name)][0] += e - s
        groups[short(name)][1] += 1
    return [{"name": n, "us_per_step": t / steps / 1e3, "count_per_step": c / steps}
            for n, (t, c) in sorted(groups.items(), key=lambda kv: -kv[1][0])]  # fmt: skip


def short(name: str) -> str:
    """Group names: drop numeric suffixes XLA adds to fusions and kernels (fusion.123 -> fusion)."""
    return re.sub(r"(_\d+|\.\d+)+$", "", name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-dtype", default=None)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default="profile_step_out")
    ap.add_argument("--no-fused-write", action="store_true",
                    help="scatter the K/V before the decode kernel instead of writing it inside the kernel")
    ap.add_argument("--decode-steps", type=int, default=0,
                    help="also time K decode steps per device call (multi-step decode) against single steps")
    ap.add_argument("--target-programs", type=int, default=None,
                    help="override the decode kernel's context-split target (programs in flight)")
    ap.add_argument("--dispatch-probe", action="store_true",
                    help="with --decode-steps: time a call's dispatch while the previous call still runs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import warnings

    warnings.filterwarnings("ignore", message=".*random.*")
    model = jkv.load_model(args.model, dtype=args.dtype)
    cfg = model.config
    blocks = args.rows * math.ceil(cfg.n_positions / args.block_size) + 1
    eng = jkv.Engine(model, num_blocks=blocks, block_size=args.block_size, max_num_seqs=args.rows,
                     kv_dtype=args.kv_dtype, enable_prefix_caching=False)  # fmt: skip
    x = decode_inputs(eng, args.rows, args.context)
    eng.runner.fuse_decode_write = not args.no_fused_write
    if args.target_programs:
        from pallas_kernels import paged_decode

        paged_decode.TARGET_PROGRAMS = args.target_programs

    compiled = eng.runner.lower(eng.pools, x, decode=True).compile()
    hlo = compiled.as_text()
    (out / "decode_step.hlo.txt").write_text(hlo)
    copies = pool_copies(hlo, eng.pools.k[0].shape)
    mem = compiled.memory_analysis()

    for _ in range(5):
        toks, _, eng.pools = eng.runner.run(eng.pools, x, decode=True, greedy=True)
    toks.block_until_ready()
    walls = []
    for _ in range(30):
        t0 = time.perf_counter()
        toks, _, eng.pools = eng.runner.run(eng.pools, x, decode=True, greedy=True)
        toks.block_until_ready()
        walls.append(time.perf_counter() - t0)
    wall = float(np.median(walls))
    # How long the calling thread is held by a dispatch (the call returning, not the device finishing): if XLA
    # launches the step's kernels on the calling thread, this is most of the step, and host work cannot overlap.
    calls = []
    for _ in range(30):
        toks.block_until_ready()
        t0 = time.perf_counter()
        toks, _, eng.pools = eng.runner.run(eng.pools, x, decode=True, greedy=True)
        calls.append(time.perf_counter() - t0)
    toks.block_until_ready()
    dispatch = float(np.median(calls))

    trace_dir = out / "trace"
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(args.steps):
            toks, _, eng.pools = eng.runner.run(eng.pools, x, decode=True, greedy=True)
        toks.block_until_ready()
    events = kernel_events(trace_dir)
    if not events and jax.default_backend() == "gpu":
        from jax.profiler import ProfileData

        files = sorted(glob.glob(str(trace_dir / "**" / "*.xplane.pb"), recursive=True))
        names = [(p.name, [ln.name for ln in p.lines]) for p in ProfileData.from_file(files[-1]).planes]
        print("no kernel events found; planes and lines in the trace:", names)
    kernels = kernel_table(events, args.steps)
    busy = busy_ns(events) / args.steps / 1e3
    # The traced steps were dispatched back to back (no sync between them): if the host keeps ahead, the GPU
    # span per step approaches the busy time; the rest is the gaps between kernels on the device.
    span = span_ns(events) / args.steps / 1e3
    total = sum(k["us_per_step"] for k in kernels)
    result = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": cfg.name, "dtype": args.dtype,
        "kv_dtype": eng.kv_dtype, "rows": args.rows, "context": args.context, "backend": eng.runner.backend,
        "fused_write": eng.runner.fuse_decode_write, "target_programs": args.target_programs,
        "wall_us": 1e6 * wall, "busy_us": busy, "span_us_async": span, "kernel_sum_us": total,
        "launches_per_step": len(events) / args.steps, "pool_copies_in_hlo": copies,
        "command_buffers_in_hlo": hlo.count("command_buffer"),
        "temp_bytes": mem.temp_size_in_bytes if mem else None,
        "kernels": kernels,
    }  # fmt: skip
    result["dispatch_us"] = 1e6 * dispatch
    if args.decode_steps > 1:
        result["multi_step"] = time_multi_step(eng, args, out)
        if args.dispatch_probe:
            result["dispatch_probe"] = dispatch_probe(eng, args)
    (out / "profile_step.json").write_text(json.dumps(result, indent=2))
    print(f"{result['device']}  {cfg.name} {args.dtype} weights, {eng.kv_dtype} KV, {args.rows} rows x {args.context} "
          f"tokens, attention={eng.runner.backend}, fused K/V write {eng.runner.fuse_decode_write}, "
          f"split target {args.target_programs or 'default'}")  # fmt: skip
    print(f"step wall {1e6 * wall:.0f} us (synchronous) | GPU span {span:.0f} us/step when dispatched back to back | "
          f"GPU busy {busy:.0f} us | kernel sum {total:.0f} us | "
          f"{len(events) / args.steps:.0f} launches/step | temp {result['temp_bytes']} B | "
          f"pool copies in HLO: {len(copies)} | command_buffer mentions: {result['command_buffers_in_hlo']} | "
          f"dispatch returns after {1e6 * dispatch:.0f} us")  # fmt: skip
    if "multi_step" in result:
        m = result["multi_step"]
        print(f"multi-step: {m['steps']} decode steps per call: wall {m['wall_us_per_step']:.0f} us/step "
              f"(synchronous call / steps) | GPU span {m['span_us_per_step']:.0f} us/step | busy "
              f"{m['busy_us_per_step']:.0f} us/step | dispatch returns after {m['dispatch_us']:.0f} us | "
              f"{m['launches_per_step']:.0f} launches/step")  # fmt: skip
        print(f"    untraced, 12 calls back to back: {m['b2b_wall_us_per_step']:.0f} us/step -> GPU idle "
              f"{100 * m['idle_share_untraced']:.1f}% against the traced busy time")  # fmt: skip
        print("    idle between kernels while traced, us per decode step, by gap size: "
              + ", ".join(f"{b} {v:.1f}" for b, v in m["gap_us_per_step"].items()))
        for kern in m["kernels"][: args.top]:
            print(f"    {kern['name'][:56]:56s} {kern['us_per_step']:9.1f} {kern['count_per_step']:7.1f}")
    for name, v in result.get("dispatch_probe", {}).items():
        print(f"dispatch of a {args.decode_steps}-step call, {name}: returns after {v['dispatch_us_device_idle']:.0f} us "
              f"(device idle) / {v['dispatch_us_device_busy']:.0f} us (device busy with the previous call)")  # fmt: skip
    print(f"{'kernel':60s} {'us/step':>9s} {'n/step':>7s} {'share':>6s}")
    for k in kernels[: args.top]:
        print(f"{k['name'][:60]:60s} {k['us_per_step']:9.1f} {k['count_per_step']:7.1f} "
              f"{100 * k['us_per_step'] / max(total, 1e-9):5.1f}%")  # fmt: skip


def dispatch_probe(eng, args) -> dict:
    """Does dispatching a multi-step call wait for the previous call to finish on the device? Median time for
    the dispatch of call B to return when call A was dispatched just before it (device busy), against the
    same with the device idle; for the engine's path (NumPy inputs, pools donated), inputs already on the
    device, and a jit that does not donate the pools."""
    from functools import partial

    from jkv import runner as runner_mod

    k = args.decode_steps
    x = decode_inputs(eng, args.rows, args.context - k + 1, steps=k)
    r = eng.runner
    ints, floats = runner_mod.pack(x)
    ints_d, floats_d = jax.device_put(ints), jax.device_put(floats)
    fn = r._steps_fn(True, r._shape(x), k)
    plain = jax.jit(partial(runner_mod._decode_steps, shape=r._shape(x), num_steps=k, block_size=r.block_size,
                            config=r.config, backend=r.backend, greedy=True, window=r.window,
                            fuse_write=r.fuse_decode_write))  # fmt: skip
    state = {"pools": eng.pools, "buf": r.zero_tokens()}

    def call(f, i, fl, donate=True):
        toks, pools, buf = f(r.params, state["pools"], i, fl, state["buf"])
        if donate:
            state["pools"] = pools
        state["buf"] = buf
        return toks

    variants = {"engine path (NumPy inputs, donated pools)": (fn, ints, floats, True),
                "inputs already on the device, donated pools": (fn, ints_d, floats_d, True),
                "inputs on the device, pools not donated": (plain, ints_d, floats_d, False)}  # fmt: skip
    result = {}
    for name, (f, i, fl, donate) in variants.items():
        call(f, i, fl, donate).block_until_ready()  # compiled and warm
        idle, busy = [], []
        for _ in range(7):
            t0 = time.perf_counter()
            a = call(f, i, fl, donate)
            idle.append(time.perf_counter() - t0)
            a.block_until_ready()
            call(f, i, fl, donate)  # the device is busy with this one while the next is dispatched
            t0 = time.perf_counter()
            b = call(f, i, fl, donate)
            busy.append(time.perf_counter() - t0)
            b.block_until_ready()
        result[name] = {"dispatch_us_device_idle": 1e6 * float(np.median(idle)),
                        "dispatch_us_device_busy": 1e6 * float(np.median(busy))}  # fmt: skip
    eng.pools = state["pools"]
    return result


def time_multi_step(eng, args, out: Path) -> dict:
    """Time `args.decode_steps` decode steps per device call (StepRunner.run_decode_steps) on the same rows."""
    k = args.decode_steps
    x = decode_inputs(eng, args.rows, args.context - k + 1, steps=k)  # the steps end at `context` tokens
    hlo = eng.runner.lower(eng.pools, x, decode=True, num_steps=k).compile().as_text()
    (out / f"decode_steps{k}.hlo.txt").write_text(hlo)
    buf = eng.runner.zero_tokens()
    for _ in range(3):
        toks, eng.pools, buf = eng.runner.run_decode_steps(eng.pools, x, buf, num_steps=k, greedy=True)
    toks.block_until_ready()
    walls, calls = [], []
    for _ in range(15):
        t0 = time.perf_counter()
        toks, eng.pools, buf = eng.runner.run_decode_steps(eng.pools, x, buf, num_steps=k, greedy=True)
        calls.append(time.perf_counter() - t0)
        toks.block_until_ready()
        walls.append(time.perf_counter() - t0)
    # Untraced, calls dispatched back to back (no sync between): wall per step against the traced busy time
    # gives the idle share without the tracer's launch overhead.
    b2b_calls = 12
    toks.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(b2b_calls):
        toks, eng.pools, buf = eng.runner.run_decode_steps(eng.pools, x, buf, num_steps=k, greedy=True)
    toks.block_until_ready()
    b2b = (time.perf_counter() - t0) / (b2b_calls * k)
    trace_dir = out / f"trace_steps{k}"
    calls_traced = max(2, 20 // k)
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(calls_traced):
            toks, eng.pools, buf = eng.runner.run_decode_steps(eng.pools, x, buf, num_steps=k, greedy=True)
        toks.block_until_ready()
    events = kernel_events(trace_dir)
    n = calls_traced * k
    ordered = sorted(events, key=lambda ev: ev[1])
    per_step = len(ordered) // n
    # one step's kernels in launch order, from the middle of the traced window: name, µs, gap before it (µs)
    mid = ordered[(n // 2) * per_step : (n // 2 + 1) * per_step + 1]
    sequence = [{"name": short(nm), "us": (e - s) / 1e3, "gap_us": (s - mid[i - 1][2]) / 1e3 if i else None}
                for i, (nm, s, e) in enumerate(mid)]  # fmt: skip
    gaps = [(b[1] - a[2], a[0], b[0]) for a, b in itertools.pairwise(ordered)]  # idle before each kernel, ns
    bins = {"<1us": (0, 1e3), "1-5us": (1e3, 5e3), ">=5us": (5e3, float("inf"))}
    busy_step = busy_ns(events) / n / 1e3
    return {"steps": k, "b2b_wall_us_per_step": 1e6 * b2b, "idle_share_untraced": 1 - busy_step / (1e6 * b2b),
            # where the idle time sits: positive gaps between consecutive kernels by size, µs per decode step
            "gap_us_per_step": {b: sum(g for g, _, _ in gaps if lo <= g < hi) / n / 1e3 for b, (lo, hi) in bins.items()},
            "largest_gaps": [{"us": g / 1e3, "after": short(a), "before": short(b)}
                             for g, a, b in sorted(gaps, reverse=True)[:12]],
            "kernels": kernel_table(events, n),
            "one_step_in_order": sequence, "wall_us_per_step": 1e6 * float(np.median(walls)) / k,
            "dispatch_us": 1e6 * float(np.median(calls)), "busy_us_per_step": busy_step,
            "span_us_per_step": span_ns(events) / n / 1e3, "launches_per_step": len(events) / n,
            "pool_copies_in_hlo": len(pool_copies(hlo, eng.pools.k[0].shape))}  # fmt: skip


if __name__ == "__main__":
    main()
