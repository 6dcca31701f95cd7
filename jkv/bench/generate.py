"""End-to-end generation throughput: jkv's paged engine, static padded batching (jkv.reference) and Hugging Face
`generate()` on the same workload, the paged engine's correctness check, one synchronous decode step's device time,
and the GPU idle share of the engine's loop (`idle_probe`, in a child process).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

import jkv
from jkv.bench import CheckFailed
from jkv.bench import child as harness
from jkv.bench.probe import StepProbe
from jkv.bench.serving import Workload, drive, fixed_workload, workload
from jkv.bench.trace import busy_ns, kernel_events, span_ns

IDLE_PROBE_TIMEOUT_S = 900


def request_set(config, n: int, fixed_lengths: tuple[int, int] | None = None) -> Workload:
    """The benchmark's workload for a model: `workload`'s seeded log-normal mix, or n requests of
    fixed (prompt, output) lengths."""
    if fixed_lengths:
        return fixed_workload(n, *fixed_lengths, config.vocab_size)
    return workload(n, 0, config.n_positions, config.vocab_size)


def pool_blocks(config, batch: int, block_size: int) -> int:
    """Blocks for `batch` full-length sequences plus the null block (a pool big enough that the batch cap binds)."""
    return batch * math.ceil(config.n_positions / block_size) + 1


def peak_bytes() -> int:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("peak_bytes_in_use", 0))


def paged_engine(model, *, max_num_seqs: int, num_blocks: int, block_size: int, decode_steps: int,
                 history: bool = False, fused_write: bool = True, max_seq_len: int | None = None) -> jkv.Engine:  # fmt: skip
    """The benchmark's paged engine; fused_write=False: the K/V scatter before the decode kernel (the old step)."""
    eng = jkv.Engine(model, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=2048, enable_prefix_caching=False, decode_steps=decode_steps,
                     record_history=history, max_seq_len=max_seq_len)  # fmt: skip
    StepProbe(eng).fused_write = fused_write
    return eng


def time_decode_step(eng: jkv.Engine, rows: int, context: int, iters: int = 50) -> float:
    """Median device time of one decode step of `rows` sequences at `context` tokens (the engine's own jit)."""
    probe = StepProbe(eng)
    x = probe.inputs(rows, context)
    times = []
    for i in range(iters + 5):
        t0 = time.perf_counter()
        toks, _ = probe.run(x, decode=True, greedy=True)
        toks.block_until_ready()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def idle_probe(
    model, reqs: Workload, cap: int, blocks: int, bs: int, decode_steps: int, trace_dir: str
) -> dict:
    """GPU idle share of the engine's own loop. The workload's first 4 x cap requests run three times, each on a
    fresh engine with the same schedule: once to compile, once timed, once traced. Over the middle half of the
    engine steps (the device settled before and after, in both runs): busy = union of the traced kernel
    intervals, wall = the untraced run's wall time over the same steps; idle = 1 - busy / wall. (Tracing slows
    the host's launches, so the traced span's idle share is larger; it is reported too.)

    Run it in a child process (`run_idle_probe`), so a crash costs only this estimate: tracing multi-step rounds
    crashed the process with CUDA_ERROR_LAUNCH_FAILED on an H200 (2026-11-27), once seen in XLA's autotuner
    compiling inside a trace; this probe traces only after a compiling pass, on a synchronized device."""
    sub = reqs[: 4 * cap]

    def make() -> jkv.Engine:
        return paged_engine(model, max_num_seqs=cap, num_blocks=blocks, block_size=bs, decode_steps=decode_steps)

    n_steps = len(drive(make(), sub).step_times)
    window = (n_steps // 4, 3 * n_steps // 4)
    timed = drive(make(), sub, window)
    traced = drive(make(), sub, window, trace=trace_dir)
    rows, steps, wall = timed.decode_rows, timed.decode_steps, timed.window_wall
    if (traced.decode_rows, traced.decode_steps) != (rows, steps):
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


def idle_probe_child(model_name: str, requests: int, batch: int, block_size: int, decode_steps: int,
                     trace_dir: str, fixed_lengths: list[int] | None = None) -> dict:  # fmt: skip
    """`idle_probe` on the benchmark's own model and workload, built afresh (the child's side of run_idle_probe)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*random.*")
    model = jkv.load_model(model_name, dtype="bfloat16")
    reqs = request_set(model.config, requests, tuple(fixed_lengths) if fixed_lengths else None)
    blocks = pool_blocks(model.config, batch, block_size)
    return idle_probe(model, reqs, batch, blocks, block_size, decode_steps, trace_dir)


def run_idle_probe(model_name: str, requests: int, batch: int, block_size: int, decode_steps: int, trace_dir: str,
                   fixed_lengths: tuple[int, int] | None = None) -> dict:  # fmt: skip
    """idle_probe in a child process that does not preallocate GPU memory (this process holds most of it); a
    failed child gives {"idle_probe_error": why}."""
    env = os.environ | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    kwargs = {"model_name": model_name, "requests": requests, "batch": batch, "block_size": block_size,
              "decode_steps": decode_steps, "trace_dir": trace_dir,
              "fixed_lengths": list(fixed_lengths) if fixed_lengths else None}  # fmt: skip
    done = harness.run("jkv.bench.generate:idle_probe_child", kwargs, env, timeout=IDLE_PROBE_TIMEOUT_S)
    if done.timed_out:
        return {"idle_probe_error": "timed out"}
    if done.result is not None:
        return done.result
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"idle_probe_error": f"the probe process exited with {done.returncode}: {tail[:300]}"}


def static_padded(model, reqs: Workload, batch: int) -> tuple[float, int, float]:
    """Arrival-order batches padded to the longest prompt, each run for its longest output (dense cache);
    (wall s, useful output tokens, KV waste)."""
    import jax

    from jkv.reference import reference_generate

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


def hf_generate(reqs: Workload, batch: int, config, dtype: str = "bfloat16") -> tuple[float, int, int]:
    """Hugging Face `generate()` in PyTorch on the GPU, same lengths, batches of `batch`, left padding; (wall s,
    useful output tokens, peak bytes). Raises ImportError without torch and transformers."""
    import torch
    import transformers

    from jkv.weights import config_to_hf

    raw = config_to_hf(config)
    cfg = transformers.AutoConfig.for_model(raw.pop("model_type"),
                                            **{k: v for k, v in raw.items() if k not in ("_name_or_path", "architectures")})  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device("cuda"):  # initialised on the card: an 8B model in seconds, no host copy
            m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    finally:
        torch.set_default_dtype(default)
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


def check_correct(model, block_size: int) -> None:
    """Paged engine vs dense reference, greedy, on a float32 copy (bf16 ties could flip either way); raises
    CheckFailed when they disagree."""
    import jax
    import jax.numpy as jnp

    from jkv.reference import reference_generate

    f32 = jkv.Model(model.config, jax.tree.map(lambda a: a.astype(jnp.float32), model.params), jnp.float32)
    rng = np.random.default_rng(123)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (5, 40, 130)]
    ref = reference_generate(f32, prompts, max_tokens=16)
    outs = jkv.generate(f32, prompts, jkv.SamplingParams(max_tokens=16), num_blocks=64, block_size=block_size,
                        max_num_seqs=8)  # fmt: skip
    ok = [o.token_ids == r for o, r in zip(outs, ref, strict=True)]
    if not all(ok):
        raise CheckFailed(f"paged engine disagrees with the dense reference: {ok}")
