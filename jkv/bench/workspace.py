"""The device memory of the engine's steps beyond parameters and KV pool, by decode batch: what the planner's
activation term must cover. Each measurement is a child process (`jkv.bench.child`), several side by side.

- `workspace_child`: one batch of one row: the decode step's compile peak (XLA's GEMM autotuner allocates its
  candidates' buffers from the same pool) and run peak, then the plan's prefill chunk's, above the bytes in use
  before the first compile, with XLA's own accounting (`memory_analysis()`) and the planner's term beside them.
- `sweep_child`: XLA's accounting of many batches of a row, compiled ahead of time in one process (nothing runs).
- `free_child` / `free_search`: the least free pool memory with which the decode step compiles and runs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

from jkv.bench import child as harness
from jkv.bench import echo
from jkv.bench.memory import (
    ballast_chunks,
    compiled_analysis,
    load_row,
    plan_activation,
    prefill_step,
    run_step,
    short_blocks,
)
from jkv.bench.probe import StepProbe

MiB = 2**20
SMALL_POOL_BLOCKS = 257  # small_engine's pool: the steps' workspace does not depend on the pool's size
FREE_SEARCH_FRACTION = (
    "0.05"  # XLA_PYTHON_CLIENT_MEM_FRACTION of a free_search child (7.5 GB on an H200: many fit)
)


def process_bytes() -> int | None:
    """This process's device memory by nvidia-smi, or None where the container hides other PIDs."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         check=False, capture_output=True, text=True).stdout  # fmt: skip
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()) and used.strip().isdigit():
            return int(used) * MiB
    return None


def workspace_child(model_name: str, kv: str, batch: int, aot: bool = True) -> dict:
    """One batch of one row (module docstring); every peak is above the bytes in use before the first compile.
    aot=False: no ahead-of-time compile; the step compiles when it first runs, as in the engine (compile_peak and
    XLA's accounting are then absent)."""
    _, dev, plan, model = load_row(model_name, kv, 24 * 10**9, 0.9)  # (the plan sizes the prefill chunk only)
    import jax

    import jkv

    stats = dev.memory_stats
    params = stats()["bytes_in_use"]
    shortest, per_short = short_blocks(plan)
    eng = jkv.Engine(model, num_blocks=batch * per_short + 1, kv_dtype=kv, attention="auto",
                     max_num_seqs=max(batch, prefill_step(plan)[0]),  # room for the prefill's rows
                     max_num_batched_tokens=plan.workspaces[0].tokens)  # fmt: skip
    probe = StepProbe(eng)
    probe.synchronize()
    pool = stats()["bytes_in_use"] - params
    base = stats()["bytes_in_use"]
    out = {"model": model_name, "kv_dtype": kv, "batch": batch, "params": params, "pool": pool,
           "planned_activation": plan_activation(plan, batch), "shortest": shortest}  # fmt: skip
    out["decode"] = compiled_analysis(probe, batch, shortest, 1) if aot else {}
    out["decode"]["compile_peak"] = stats()["peak_bytes_in_use"] - base if aot else None
    run_step(probe, batch, shortest, 1)
    out["decode"]["run_peak"] = stats()["peak_bytes_in_use"] - base
    out["decode"]["largest_alloc"] = stats().get("largest_alloc_size")
    out["prefill"] = compiled_analysis(probe, *prefill_step(plan)) if aot else {}
    out["prefill"]["compile_peak"] = stats()["peak_bytes_in_use"] - base if aot else None
    run_step(probe, *prefill_step(plan))
    out["prefill"]["run_peak"] = stats()["peak_bytes_in_use"] - base
    s = stats()
    out["after_in_use"] = s["bytes_in_use"] - base
    used = process_bytes()
    out["outside"] = None if used is None else used - s.get("pool_bytes", s["bytes_reserved"])
    out["device"], out["jax"] = dev.device_kind, jax.__version__
    return out


def small_engine(model, kv: str, batch: int, chunk: int):
    """An engine whose pool is small (257 blocks): the steps' workspace does not depend on the pool's size (the
    pools are donated and updated in place), and a small pool leaves the card's memory to the step."""
    import jkv

    return jkv.Engine(model, num_blocks=SMALL_POOL_BLOCKS, kv_dtype=kv, max_num_seqs=batch, attention="auto",
                      max_num_batched_tokens=chunk)  # fmt: skip


def sweep_child(model_name: str, kv: str, batches: list[int]) -> dict:
    """XLA's accounting of the decode step at every batch in `batches` and of the plan's prefill chunk, compiled
    ahead of time in one process (nothing runs)."""
    _, dev, plan, model = load_row(model_name, kv, 24 * 10**9, 0.9)
    shortest, _ = short_blocks(plan)
    probe = StepProbe(
        small_engine(model, kv, max(*batches, prefill_step(plan)[0]), plan.workspaces[0].tokens)
    )
    out = {
        "model": model_name,
        "kv_dtype": kv,
        "prefill": compiled_analysis(probe, *prefill_step(plan)),
        "decode": {},
    }
    out["prefill_step"] = prefill_step(plan)
    for b in batches:
        out["decode"][b] = compiled_analysis(probe, b, shortest, 1) | {
            "planned_activation": plan_activation(plan, b)
        }
    out["device"] = dev.device_kind
    return out


def free_child(model_name: str, kv: str, batch: int, free: int) -> dict:
    """Whether the decode step of `batch` rows compiles (XLA's autotuner allocates its candidates' buffers from the
    pool) and then runs, with only `free` bytes of JAX's pool left: ballast arrays hold the rest."""
    _, dev, plan, model = load_row(model_name, kv, 24 * 10**9, 0.9)
    import jax
    import jax.numpy as jnp

    shortest, _ = short_blocks(plan)
    probe = StepProbe(small_engine(model, kv, batch, plan.workspaces[0].tokens))
    probe.synchronize()
    s = dev.memory_stats()
    ballast = [jnp.zeros(n, jnp.uint8) for n in ballast_chunks(s["bytes_limit"] - s["bytes_in_use"] - free)]
    jax.block_until_ready(ballast)
    s = dev.memory_stats()
    out = {"model": model_name, "kv_dtype": kv, "batch": batch, "free_asked": free,
           "free": s["bytes_limit"] - s["bytes_in_use"], "compile_ok": False, "run_ok": False,
           "error": None}  # fmt: skip
    try:
        compiled_analysis(probe, batch, shortest, 1)
        out["compile_ok"] = True
        run_step(probe, batch, shortest, 1)
        out["run_ok"] = True
    except Exception as err:  # noqa: BLE001 - running out of memory is the answer
        out["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return out


def parse_rows(specs: list[str]) -> list[tuple[str, str, int]]:
    """`model:kv:b1,b2` -> [(model, kv, b1), (model, kv, b2)]; a malformed entry raises ValueError."""
    jobs = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2]:
            raise ValueError(
                f"--rows entry {spec!r} must read MODEL:KV_DTYPE:B1,B2 (e.g. gpt2:bfloat16:1024,4033)."
            )
        jobs += [(parts[0], parts[1], int(b)) for b in parts[2].split(",")]
    return jobs


def parse_free(specs: list[str]) -> list[tuple[str, str, int, int, int]]:
    """`model:kv:batch:lo_mib:hi_mib` entries of the free search; a malformed one raises ValueError."""
    targets = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 5 or not all(p.isdigit() for p in parts[2:]) or int(parts[3]) >= int(parts[4]):
            raise ValueError(f"--free entry {spec!r} must read MODEL:KV_DTYPE:BATCH:LO_MIB:HI_MIB with LO < HI "
                             "(e.g. gpt2:bfloat16:4096:700:1800).")  # fmt: skip
        targets.append((parts[0], parts[1], int(parts[2]), int(parts[3]), int(parts[4])))
    return targets


def run_children(jobs: list[harness.Job], env: dict | list[dict], width: int) -> list[dict | None]:
    """The jobs' children, `width` side by side (`env`: one for all, or one per child); their RESULTs in order
    (None for a child that died, whose stderr is printed)."""
    results = []
    for (target, kwargs), outcome in zip(jobs, harness.run_in_waves(jobs, env, width), strict=True):
        if outcome.result is None:
            print(f"child {target} {kwargs} failed\n{outcome.stderr[-1500:]}", flush=True)
        results.append(outcome.result)
    return results


RunChildren = Callable[[list[harness.Job], dict, int], list[dict | None]]


def free_search(targets: list[tuple[str, str, int, int, int]], width: int, rounds: int, *,
                run: RunChildren = run_children, log: Callable[[str], None] = echo) -> list[dict]:  # fmt: skip
    """Per target (model, kv, batch, lo MiB, hi MiB): the least free pool memory with which the decode step compiles
    and runs, narrowed from [lo, hi] by `rounds` rounds of evenly spaced tries (all targets' tries side by side,
    `free_child` processes through `run`)."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=FREE_SEARCH_FRACTION)
    bounds = {
        t[:3]: [t[3] * MiB, t[4] * MiB] for t in targets
    }  # [largest free that failed, smallest that ran]
    tries: list[dict] = []
    per = max(1, width // len(targets))
    for _ in range(rounds):
        jobs = []
        for (m, kv, b), (lo, hi) in bounds.items():
            jobs += [(m, kv, b, lo + (hi - lo) * i // (per + 1)) for i in range(1, per + 1)]
        child_jobs = [("jkv.bench.workspace:free_child", {"model_name": m, "kv": kv, "batch": b, "free": f})
                      for m, kv, b, f in jobs]  # fmt: skip
        for (m, kv, b, _), res in zip(jobs, run(child_jobs, env, width), strict=True):
            if res is None:
                continue
            tries.append(res)
            lo_hi = bounds[(m, kv, b)]
            if res["run_ok"]:
                lo_hi[1] = min(lo_hi[1], res["free"])
            else:
                lo_hi[0] = max(lo_hi[0], res["free"])
        log("  " + "  ".join(f"{m} {kv} B={b}: ({lo / MiB:.1f}, {hi / MiB:.1f}] MiB"
                             for (m, kv, b), (lo, hi) in bounds.items()))  # fmt: skip
    return [{"model": m, "kv_dtype": kv, "batch": b, "need_above": lo, "need_at_most": hi,
             "tries": [t for t in tries if (t["model"], t["kv_dtype"], t["batch"]) == (m, kv, b)]}
            for (m, kv, b), (lo, hi) in bounds.items()]  # fmt: skip
