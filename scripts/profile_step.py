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
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

import jkv  # noqa: E402
from jkv.bench.probe import StepProbe  # noqa: E402
from jkv.bench.step_profile import dispatch_probe, multi_step, set_split_target, single_step  # noqa: E402
from jkv.bench.trace import plane_names  # noqa: E402


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
    ap.add_argument(
        "--no-fused-write",
        action="store_true",
        help="scatter the K/V before the decode kernel instead of writing it inside the kernel",
    )
    ap.add_argument(
        "--decode-steps",
        type=int,
        default=0,
        help="also time K decode steps per device call (multi-step decode) against single steps",
    )
    ap.add_argument(
        "--target-programs",
        type=int,
        default=None,
        help="override the decode kernel's context-split target (programs in flight)",
    )
    ap.add_argument(
        "--dispatch-probe",
        action="store_true",
        help="with --decode-steps: time a call's dispatch while the previous call still runs",
    )
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
    probe = StepProbe(eng)
    try:
        x, x_k = probe.inputs(args.rows, args.context), None
        if args.decode_steps > 1:  # the multi-step call's steps end at `context` tokens
            x_k = probe.inputs(args.rows, args.context - args.decode_steps + 1, steps=args.decode_steps)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    probe.fused_write = not args.no_fused_write
    if args.target_programs:
        set_split_target(args.target_programs)

    step = single_step(probe, x, args.steps, out)
    if not step["launches_per_step"] and jax.default_backend() == "gpu":
        print("no kernel events found; planes and lines in the trace:", plane_names(out / "trace"))
    result = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": cfg.name, "dtype": args.dtype,
        "kv_dtype": eng.kv_dtype, "rows": args.rows, "context": args.context, "backend": probe.backend,
        "fused_write": probe.fused_write, "target_programs": args.target_programs, **step,
    }  # fmt: skip
    wall, busy, span, total = (
        step["wall_us"] / 1e6,
        step["busy_us"],
        step["span_us_async"],
        step["kernel_sum_us"],
    )
    dispatch, copies, kernels = step["dispatch_us"] / 1e6, step["pool_copies_in_hlo"], step["kernels"]
    if x_k is not None:
        result["multi_step"] = multi_step(probe, x_k, args.decode_steps, out)
        if args.dispatch_probe:
            result["dispatch_probe"] = dispatch_probe(probe, x_k, args.decode_steps)
    (out / "profile_step.json").write_text(json.dumps(result, indent=2))
    print(f"{result['device']}  {cfg.name} {args.dtype} weights, {eng.kv_dtype} KV, {args.rows} rows x {args.context} "
          f"tokens, attention={probe.backend}, fused K/V write {probe.fused_write}, "
          f"split target {args.target_programs or 'default'}")  # fmt: skip
    print(f"step wall {1e6 * wall:.0f} us (synchronous) | GPU span {span:.0f} us/step when dispatched back to back | "
          f"GPU busy {busy:.0f} us | kernel sum {total:.0f} us | "
          f"{step['launches_per_step']:.0f} launches/step | temp {result['temp_bytes']} B | "
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
        print(
            "    idle between kernels while traced, us per decode step, by gap size: "
            + ", ".join(f"{b} {v:.1f}" for b, v in m["gap_us_per_step"].items())
        )
        for kern in m["kernels"][: args.top]:
            print(f"    {kern['name'][:56]:56s} {kern['us_per_step']:9.1f} {kern['count_per_step']:7.1f}")
    for name, v in result.get("dispatch_probe", {}).items():
        print(f"dispatch of a {args.decode_steps}-step call, {name}: returns after {v['dispatch_us_device_idle']:.0f} us "
              f"(device idle) / {v['dispatch_us_device_busy']:.0f} us (device busy with the previous call)")  # fmt: skip
    print(f"{'kernel':60s} {'us/step':>9s} {'n/step':>7s} {'share':>6s}")
    for k in kernels[: args.top]:
        print(f"{k['name'][:60]:60s} {k['us_per_step']:9.1f} {k['count_per_step']:7.1f} "
              f"{100 * k['us_per_step'] / max(total, 1e-9):5.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
