"""Where the device time of one engine decode step goes: wall and dispatch time, per-kernel GPU time from a
jax.profiler trace, whole-pool copies in the optimized HLO; the same for a multi-step decode call (K steps per
call), with the idle gaps between its kernels and whether a call's dispatch waits for the previous call.

Every function runs the engine's own jitted steps through a `StepProbe` on synthetic inputs (`probe.inputs`).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from jkv.bench.probe import StepInputs, StepProbe
from jkv.bench.trace import (
    busy_ns,
    gap_us_per_step,
    gaps,
    kernel_events,
    kernel_table,
    one_step_in_order,
    pool_copies,
    short,
    span_ns,
)

WARM_CALLS = 5  # untimed calls before the single step is timed
TIMED_CALLS = 30  # calls per median of the single step
MULTI_TIMED_CALLS = 15  # calls per median of the multi-step call
B2B_CALLS = 12  # multi-step calls dispatched back to back, untraced
PROBE_ROUNDS = 7  # rounds per variant of the dispatch probe


def set_split_target(programs: int) -> None:
    """Override the decode kernel's context-split target (programs in flight) for this process."""
    from pallas_kernels import tuning

    tuning.TARGET_PROGRAMS = programs


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def single_step(probe: StepProbe, x: StepInputs, traced_steps: int, out: Path) -> dict:
    """One greedy decode step on `x`: XLA's temp bytes and pool copies of its HLO (saved under `out`), the median
    synchronous wall time, how long a dispatch holds the calling thread, and the kernels of `traced_steps` steps
    dispatched back to back under the profiler (trace under out/trace): busy time (union of kernel intervals),
    GPU span, launches, the kernel table. Times in µs per step."""
    compiled = probe.compile(x, decode=True)
    hlo = compiled.as_text()
    (out / "decode_step.hlo.txt").write_text(hlo)
    copies = pool_copies(hlo, probe.pool_shape)
    mem = compiled.memory_analysis()

    def step() -> jax.Array:
        return probe.run(x, decode=True, greedy=True)[0]

    for _ in range(WARM_CALLS):
        toks = step()
    toks.block_until_ready()
    walls = []
    for _ in range(TIMED_CALLS):
        t0 = time.perf_counter()
        step().block_until_ready()
        walls.append(time.perf_counter() - t0)
    # How long the calling thread is held by a dispatch (the call returning, not the device finishing): if XLA
    # launches the step's kernels on the calling thread, this is most of the step, and host work cannot overlap.
    calls = []
    for _ in range(TIMED_CALLS):
        toks.block_until_ready()
        t0 = time.perf_counter()
        toks = step()
        calls.append(time.perf_counter() - t0)
    toks.block_until_ready()
    trace_dir = out / "trace"
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(traced_steps):
            toks = step()
        toks.block_until_ready()
    events = kernel_events(trace_dir)
    kernels = kernel_table(events, traced_steps)
    # The traced steps were dispatched back to back (no sync between them): if the host keeps ahead, the GPU
    # span per step approaches the busy time; the rest is the gaps between kernels on the device.
    return {
        "wall_us": 1e6 * _median(walls), "busy_us": busy_ns(events) / traced_steps / 1e3,
        "span_us_async": span_ns(events) / traced_steps / 1e3, "kernel_sum_us": sum(k["us_per_step"] for k in kernels),
        "launches_per_step": len(events) / traced_steps, "pool_copies_in_hlo": copies,
        "command_buffers_in_hlo": hlo.count("command_buffer"),
        "temp_bytes": mem.temp_size_in_bytes if mem else None, "kernels": kernels,
        "dispatch_us": 1e6 * _median(calls),
    }  # fmt: skip


def multi_step(probe: StepProbe, x: StepInputs, k: int, out: Path) -> dict:
    """`k` greedy decode steps per device call on `x` (multi-step inputs, `probe.inputs(..., steps=k)`): wall per
    step, dispatch time, the untraced wall of calls dispatched back to back (the tracer's per-launch cost inflates
    the traced span, so idle is busy against this), the kernels of one step in launch order and the idle gaps
    between kernels while traced. HLO under out/decode_steps{k}.hlo.txt, trace under out/trace_steps{k}."""
    hlo = probe.compile(x, decode=True, num_steps=k).as_text()
    (out / f"decode_steps{k}.hlo.txt").write_text(hlo)
    for _ in range(3):
        toks = probe.run_decode_steps(x, k)
    toks.block_until_ready()
    walls, calls = [], []
    for _ in range(MULTI_TIMED_CALLS):
        t0 = time.perf_counter()
        toks = probe.run_decode_steps(x, k)
        calls.append(time.perf_counter() - t0)
        toks.block_until_ready()
        walls.append(time.perf_counter() - t0)
    # Untraced, calls dispatched back to back (no sync between): wall per step against the traced busy time
    # gives the idle share without the tracer's launch overhead.
    toks.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(B2B_CALLS):
        toks = probe.run_decode_steps(x, k)
    toks.block_until_ready()
    b2b = (time.perf_counter() - t0) / (B2B_CALLS * k)
    trace_dir = out / f"trace_steps{k}"
    calls_traced = max(2, 20 // k)
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(calls_traced):
            toks = probe.run_decode_steps(x, k)
        toks.block_until_ready()
    events = kernel_events(trace_dir)
    n = calls_traced * k
    busy_step = busy_ns(events) / n / 1e3
    return {"steps": k, "b2b_wall_us_per_step": 1e6 * b2b, "idle_share_untraced": 1 - busy_step / (1e6 * b2b),
            # where the idle time sits: positive gaps between consecutive kernels by size, µs per decode step
            "gap_us_per_step": gap_us_per_step(events, n),
            "largest_gaps": [{"us": g / 1e3, "after": short(a), "before": short(b)}
                             for g, a, b in sorted(gaps(events), reverse=True)[:12]],
            "kernels": kernel_table(events, n),
            "one_step_in_order": one_step_in_order(events, n), "wall_us_per_step": 1e6 * _median(walls) / k,
            "dispatch_us": 1e6 * _median(calls), "busy_us_per_step": busy_step,
            "span_us_per_step": span_ns(events) / n / 1e3, "launches_per_step": len(events) / n,
            "pool_copies_in_hlo": len(pool_copies(hlo, probe.pool_shape))}  # fmt: skip


def dispatch_probe(probe: StepProbe, x: StepInputs, k: int) -> dict:
    """Does dispatching a multi-step call wait for the previous call to finish on the device? Median time for
    the dispatch of call B to return when call A was dispatched just before it (device busy), against the
    same with the device idle; for the engine's path (NumPy inputs, pools donated), inputs already on the
    device, and a jit that does not donate the pools (`StepProbe.dispatch_calls`)."""
    result = {}
    for name, call in probe.dispatch_calls(x, k).items():
        call().block_until_ready()  # compiled and warm
        idle, busy = [], []
        for _ in range(PROBE_ROUNDS):
            t0 = time.perf_counter()
            a = call()
            idle.append(time.perf_counter() - t0)
            a.block_until_ready()
            call()  # the device is busy with this one while the next is dispatched
            t0 = time.perf_counter()
            b = call()
            busy.append(time.perf_counter() - t0)
            b.block_until_ready()
        result[name] = {
            "dispatch_us_device_idle": 1e6 * _median(idle),
            "dispatch_us_device_busy": 1e6 * _median(busy),
        }
    return result
