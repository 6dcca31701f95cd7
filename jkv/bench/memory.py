"""Plan vs measured device memory, term by term, and the candidates of the real-maximum-batch search.

Runs in fresh processes (`jkv.bench.child`): `plan_child` measures the plan's own pools and largest steps on a card
capped at the plan's budget; `try_batch` is one candidate of the search (`search_row`, over
`jkv.bench.search.search_max_batch`), an engine of exactly B sequences' blocks running a decode step of B rows.
The small-card emulation (`ballast_bytes`) holds in JAX's pool what a real card of the budget would not leave it.
The plan-side arithmetic (`short_blocks`, `plan_activation`, `seq_cost`, `formula_max_batch`) reads the planner.
scripts/measure_memory.py's docstring gives the method and why each step is there.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from jkv.bench import child as harness
from jkv.bench import echo
from jkv.bench.probe import GENERATE_DECODE_STEPS, StepInputs, StepProbe
from jkv.bench.search import ROW_GROWTH, BatchSearch, batch_report, search_max_batch

BALLAST_CHUNK = 2**30  # bytes per ballast array (keeps each well inside int32 indexing)


# The small-card emulation -----------------------------------------------------------------------------------
def ballast_bytes(bytes_limit: int, budget: int, outside: int) -> int:
    """Bytes to hold in JAX's pool so that what is left of it is what a real card of `budget` bytes leaves JAX.

    A real card gives JAX budget - outside (the CUDA context and kernels take the rest); here the pool holds
    bytes_limit (the budget, up to the rounding of XLA_PYTHON_CLIENT_MEM_FRACTION) with `outside` on top.
    """
    return max(0, bytes_limit - (budget - outside))


def ballast_chunks(nbytes: int, chunk: int = BALLAST_CHUNK) -> list[int]:
    """Sizes of the uint8 arrays that hold `nbytes` of ballast, none above `chunk`."""
    return [min(chunk, nbytes - at) for at in range(0, max(0, nbytes), chunk)]


def parallel_width(requested: int, budget: float, card: int, margin: int = 2 * 2**30) -> int:
    """How many probes can run side by side: each holds its capped pool plus its memory outside it (`margin`)."""
    return max(1, min(requested, int(card // (budget + margin))))


# What the plan promises -------------------------------------------------------------------------------------
def short_blocks(plan) -> tuple[int, int]:
    """(shortest listed length, engine blocks one sequence of it holds): what the planner prices max_num_seqs at.

    The planner counts one-layer blocks (a sliding layer may hold fewer); the engine's blocks span every layer, so
    for the engine's models (every layer alike) that is the planner's count over the layers.
    """
    from planner.plan import short_sequence

    shortest, layer_blocks = short_sequence(plan.config, plan.options, plan.max_seq_len)
    return shortest, -(-layer_blocks // plan.config.n_layer)


def plan_activation(plan, batch: int) -> int:
    """The plan's activation term at decode batch `batch`, as make_plan sizes it (`step_workspaces`)."""
    from planner.plan import step_workspaces

    return max(w.total for w in step_workspaces(plan.config, plan.options, batch, plan.max_seq_len))


def seq_cost(plan) -> dict:
    """Bytes one more sequence costs the plan at its maximum batch: its KV blocks at the shortest length and the
    growth of the activation term by one row (that row's activations and float32 logits copies)."""
    _, per_short = short_blocks(plan)
    kv = per_short * plan.layout.bytes_per_block
    b = plan.max_num_seqs
    workspace = plan_activation(plan, b + 1) - plan_activation(plan, b)
    return {"kv": kv, "workspace": workspace, "total": kv + workspace}


def formula_max_batch(plan) -> int:
    """The largest B the plan's own arithmetic allows: B * per_short + 1 blocks, the activation term at B, the
    parameters and the reserve within the budget. An independent check of make_plan's solve (equal since the solve
    bisects; before, it settled below this: 3,891 vs 3,924 for gpt2 at 24 GB), so real - planned is the memory
    model's margin and not the solve's."""
    _, per_short = short_blocks(plan)
    fixed = plan.param_bytes + plan.reserve_bytes + plan.layout.bytes_per_block

    def fits(b: int) -> tuple[bool, str]:
        return fixed + b * per_short * plan.layout.bytes_per_block + plan_activation(
            plan, b
        ) <= plan.budget_bytes, ""

    found = search_max_batch(fits, plan.max_num_seqs, max_tries=256)
    assert not found.cap_hit
    return found.real_max


def first_step(plan, formula: int) -> int:
    """The first candidate above the plan: one sequence more than the plan's own arithmetic allows (`formula`).
    The plan's terms are calibrated to the card (planner.memory), so this candidate failing proves the plan exact;
    the search then gallops up by doubling offsets, each step at most ROW_GROWTH (1 %), since a candidate far above
    the threshold is slow to fail (the allocator waits on each allocation it refuses, and XLA's autotuner tries
    dozens). On an H100 (2026-11-27) 1 % steps left gpt2's real maximum in [4,177, 4,187) after 6 tries."""
    return formula + 1


def prefill_step(plan) -> tuple[int, int, int]:
    """(rows, context, chunk) of the plan's largest prefill: its chunk in rows of up to max_seq_len tokens."""
    max_len, tokens = plan.max_seq_len, plan.workspaces[0].tokens
    return max(1, tokens // max_len), max_len, min(max_len, tokens)


def plan_with_reserve(model: str, kv: str, hbm: int, utilization: float, reserve: int) -> int:
    """The plan's maximum batch when its runtime reserve is `reserve` bytes (`plan.py --reserve`): with the
    memory measured outside JAX's pool on this machine, a plan calibrated to it instead of the default margin."""
    from planner import PlanOptions, load_config, make_plan

    options = PlanOptions(hbm_bytes=hbm, kv_dtype=kv, utilization=utilization, reserve_bytes=reserve)
    return make_plan(load_config(model), options).max_num_seqs


def measured_reserve(outside: int) -> int:
    """The `plan.py --reserve` this machine's measurement suggests: the memory measured outside JAX's pool plus the
    planner's allowance for its spread between runs (planner.memory.RESERVE_ALLOWANCE_BYTES)."""
    from planner.memory import RESERVE_ALLOWANCE_BYTES

    return outside + RESERVE_ALLOWANCE_BYTES


def calibrate(rows: list[dict], utilization: float) -> list[tuple[dict, int, int, bool]]:
    """Per searched row with an exact real maximum: (row, measured_reserve, the plan's maximum batch with it,
    whether that is above the real maximum: the calibrated plan over-promises). Each row's max_batch gets
    `planned_with_measured_reserve` (what `plan.py --reserve` gives a user who measured their machine)."""
    out = []
    for row in rows:
        if "max_batch" not in row or row["max_batch"].get("real") is None:
            continue
        outside = row["measured"]["reserve"] if "measured" in row else row["outside_given"]  # search-only rows
        reserve = measured_reserve(outside)
        planned = plan_with_reserve(row["model"], row["kv_dtype"], row["hbm"], utilization, reserve)
        row["max_batch"]["planned_with_measured_reserve"] = planned
        out.append((row, reserve, planned, planned > row["max_batch"]["real"]))
    return out


# The card ---------------------------------------------------------------------------------------------------
def gpu_used_bytes() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.split()[0]) * 2**20


def gpu_total_bytes() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.split()[0]) * 2**20


def outside_pool_bytes(base: int, stats: dict) -> int:
    """The process's device memory outside JAX's pool: nvidia-smi's growth since `base` minus the pool."""
    return gpu_used_bytes() - base - stats.get("pool_bytes", stats["bytes_limit"])


# The steps a measurement runs -------------------------------------------------------------------------------
def step_inputs(probe: StepProbe, rows: int, ctx: int, chunk: int, steps: int = 1) -> StepInputs:
    """Exactly `rows` rows (no bucketing) of `chunk` new tokens ending at `ctx` tokens, sampling on; with
    steps > 1, a multi-step decode call's inputs whose rows run `steps` steps from there. Distinct blocks per row
    whenever the pool has room for them all, else wrapping around it (a memory test: the K/V values do not
    matter)."""
    return probe.inputs(
        rows, ctx, chunk=chunk, steps=steps, exact_rows=True, sampling=True, share_blocks=True
    )


def run_step(probe: StepProbe, rows: int, ctx: int, chunk: int) -> None:
    """One step of the engine's jitted function on `step_inputs`, on the sampling path, waited for."""
    import jax

    jax.block_until_ready(probe.run(step_inputs(probe, rows, ctx, chunk), decode=chunk == 1, greedy=False))


def run_multi_step(probe: StepProbe, rows: int, ctx: int, steps: int) -> None:
    """One multi-step decode call (`Engine(decode_steps=steps)`, `jkv.generate`'s default) at `rows` rows."""
    import jax

    jax.block_until_ready(
        probe.run_decode_steps(step_inputs(probe, rows, ctx, 1, steps), steps, greedy=False)
    )


def compiled_analysis(probe: StepProbe, rows: int, ctx: int, chunk: int, steps: int | None = None) -> dict:
    """XLA's memory accounting of the compiled step on `step_inputs` (with `steps`, the multi-step call). Compiling
    it here is what runs XLA's GEMM autotuner for its shapes."""
    x = step_inputs(probe, rows, ctx, chunk, steps or 1)
    return probe.memory_analysis(x, decode=chunk == 1, greedy=False, num_steps=steps)


def compiled_temp(probe: StepProbe, rows: int, ctx: int, chunk: int, steps: int | None = None) -> int:
    """Bytes XLA's compiled step (with `steps`, the multi-step call) needs beyond its arguments (temp + outputs
    not aliased to the donated pools)."""
    ma = compiled_analysis(probe, rows, ctx, chunk, steps)
    return ma["temp"] + ma["output"] - ma["alias"]


def planned_stages(probe: StepProbe, plan, dev) -> tuple[dict, str | None]:
    """Compiled sizes and measured peaks of the plan's largest steps on the plan's own pools, then a multi-step
    decode call at the planned batch (`jkv.generate`'s default); the first failure."""
    shortest = min(128, plan.max_seq_len)
    b_long = plan.max_batch(plan.max_seq_len)
    k = GENERATE_DECODE_STEPS
    stages = {
        "compiled_prefill": compiled_temp(probe, *prefill_step(plan)),
        "compiled_decode_max_batch": compiled_temp(probe, plan.max_num_seqs, shortest, 1),
        "compiled_decode_256": compiled_temp(
            probe, min(256, plan.max_num_seqs), shortest, 1
        ),  # (fewer if capped)
    }
    stages["compiled_decode_steps_max_batch"] = compiled_temp(probe, plan.max_num_seqs, shortest, 1, k)
    for name, args in (("prefill", prefill_step(plan)),
                       ("decode_max_batch", (plan.max_num_seqs, shortest, 1)),
                       ("decode_max_len", (b_long, plan.max_seq_len, 1))):  # fmt: skip
        if args[0] == 0:  # not one sequence of max_seq_len fits this budget (Llama-3.1's 131072 at 24 GB)
            stages[name] = None
            continue
        try:
            run_step(probe, *args)
        except Exception as err:  # noqa: BLE001 - an OOM here means the plan over-promised
            return stages, f"{name}: {type(err).__name__}: {str(err)[:200]}"
        stages[name] = dev.memory_stats()["peak_bytes_in_use"]
    try:  # jkv.generate's multi-step decode at the planned batch: its loop must fit the same workspace
        run_multi_step(probe, plan.max_num_seqs, shortest, k)
    except Exception as err:  # noqa: BLE001
        return stages, f"decode_steps_max_batch: {type(err).__name__}: {str(err)[:200]}"
    stages["decode_steps_max_batch"] = dev.memory_stats()["peak_bytes_in_use"]
    return stages, None


# Children ---------------------------------------------------------------------------------------------------
def load_row(model_name: str, kv: str, hbm: int, utilization: float):
    """A child's start: (the card's used bytes before JAX, the device, the plan, the loaded bf16 model)."""
    import warnings

    warnings.filterwarnings("ignore")
    import jax

    import jkv
    from planner import PlanOptions, load_config, make_plan

    base = gpu_used_bytes()
    dev = jax.devices()[0]
    plan = make_plan(
        load_config(model_name), PlanOptions(hbm_bytes=hbm, kv_dtype=kv, utilization=utilization)
    )
    model = jkv.load_model(model_name, dtype="bfloat16")
    jax.block_until_ready(model.params)
    return base, dev, plan, model


def plan_child(model_name: str, kv: str, hbm: int, utilization: float) -> dict:
    """The plan's steps on the plan's own pools, term by term (a child: the cap set by its environment)."""
    base, dev, plan, model = load_row(model_name, kv, hbm, utilization)  # first: it silences warnings
    import jax

    import jkv

    params = dev.memory_stats()["bytes_in_use"]
    eng = jkv.Engine(model, num_blocks=plan.layout.num_blocks, kv_dtype=kv, max_num_seqs=plan.max_num_seqs,
                     max_num_batched_tokens=plan.workspaces[0].tokens, attention="auto")  # fmt: skip
    probe = StepProbe(eng)
    probe.synchronize()
    pool = dev.memory_stats()["bytes_in_use"] - params
    harness.log(
        f"{model_name} {kv}: the plan's steps (max batch {plan.max_num_seqs}, {plan.layout.num_blocks} blocks)"
    )
    stages, failed = planned_stages(probe, plan, dev)
    stats = dev.memory_stats()
    peak = stats["peak_bytes_in_use"]
    outside = outside_pool_bytes(base, stats)
    return {
        "model": model_name, "kv_dtype": kv, "hbm": hbm, "bytes_limit": stats["bytes_limit"],
        "planned": {"params": plan.param_bytes, "kv_pool": plan.kv_pool_bytes, "activation": plan.activation_bytes,
                    "reserve": plan.reserve_bytes, "peak": plan.peak_bytes},
        "measured": {"params": params, "kv_pool": pool, "activation": peak - params - pool,
                     "reserve": outside, "peak": peak + outside, "peak_in_use": peak},
        "largest_free_block": stats.get("largest_free_block_bytes"),
        "stages": stages, "planned_max_batch": plan.max_num_seqs,
        "planned_batch_at_max_len": plan.max_batch(plan.max_seq_len),
        "failed": failed, "device": dev.device_kind, "jax": jax.__version__,
    }  # fmt: skip


def try_batch(model_name: str, kv: str, hbm: int, utilization: float, batch: int, outside: int,
              alone: bool) -> dict:  # fmt: skip
    """One candidate of the real-max-batch search in a fresh process: the ballast, an engine of
    batch * per_short + 1 blocks and max_num_seqs=batch, a decode step of `batch` rows at the shortest length, then
    the plan's prefill chunk. Any exception means the candidate does not fit. Its own outside-pool footprint is
    measured only when it is `alone` on the card (nvidia-smi counts every process)."""
    base, dev, plan, model = load_row(model_name, kv, hbm, utilization)  # first: it silences warnings
    import jax
    import jax.numpy as jnp

    import jkv

    limit = dev.memory_stats()["bytes_limit"]
    ballast = [
        jnp.zeros(n, jnp.uint8) for n in ballast_chunks(ballast_bytes(limit, plan.budget_bytes, outside))
    ]
    jax.block_until_ready(ballast)
    in_use = dev.memory_stats()["bytes_in_use"]
    shortest, per_short = short_blocks(plan)
    t, pool, decode_peak = time.time(), None, None
    try:
        eng = jkv.Engine(model, num_blocks=batch * per_short + 1, kv_dtype=kv, max_num_seqs=batch, attention="auto",
                         max_num_batched_tokens=plan.workspaces[0].tokens)  # fmt: skip
        probe = StepProbe(eng)
        pool = dev.memory_stats()["bytes_in_use"] - in_use
        # decode first: a candidate that does not fit costs one compilation
        run_step(probe, batch, shortest, 1)
        decode_peak = dev.memory_stats()["peak_bytes_in_use"]
        run_step(probe, *prefill_step(plan))
        ok, msg = True, None
    except Exception as err:  # noqa: BLE001 - RESOURCE_EXHAUSTED is the answer we are looking for
        ok, msg = False, f"{type(err).__name__}: {str(err)[:200]}"
    stats = dev.memory_stats()
    return {
        "batch": batch, "ok": ok, "error": msg, "seconds": round(time.time() - t, 1), "blocks": batch * per_short + 1,
        "ballast": sum(a.nbytes for a in ballast), "outside_given": outside, "in_use_before": in_use,
        "peak_in_use": stats["peak_bytes_in_use"], "bytes_limit": limit, "pool": pool, "decode_peak": decode_peak,
        "outside": outside_pool_bytes(base, stats) if alone else None,
    }  # fmt: skip


# The parent's side of the search ----------------------------------------------------------------------------
RunJobs = Callable[[list[harness.Job], dict, list[Path | None]], list[harness.Outcome]]


def search_row(model: str, kv: str, hbm: int, utilization: float, outside: int, max_tries: int, env: dict,
               logs: Path | None, width: int = 1, *, run: RunJobs = harness.run_side_by_side,
               log: Callable[[str], None] = echo) -> dict:  # fmt: skip
    """The real maximum batch of one row: search_max_batch over `try_batch` candidates, each a fresh process under
    the same cap (`env`), `width` of them side by side per round (`run`). Each is given the largest outside-pool
    footprint seen so far (the plan's steps', then that of every candidate that ran alone on the card); `log`
    gets a line per candidate."""
    from planner import PlanOptions, load_config, make_plan

    plan = make_plan(load_config(model), PlanOptions(hbm_bytes=hbm, kv_dtype=kv, utilization=utilization))
    shortest, per_short = short_blocks(plan)
    seen, probes, t0 = {"outside": outside}, [], time.time()

    def fits_many(bs: list[int]) -> list[tuple[bool, str]]:
        t, alone = time.time(), len(bs) == 1
        jobs = [("jkv.bench.memory:try_batch", {"model_name": model, "kv": kv, "hbm": hbm, "utilization": utilization,
                                                "batch": b, "outside": seen["outside"], "alone": alone})
                for b in bs]  # fmt: skip
        runs = run(jobs, env, [logs / f"{model}_{kv}_{hbm}_B{b}.log" if logs else None for b in bs])
        out = []
        for b, (res, err, *_) in zip(bs, runs, strict=True):
            if res is None:  # the process died (a crash inside a library reads here as its last lines)
                res = {"batch": b, "ok": False,
                       "error": "probe died: " + " | ".join(err.strip().splitlines()[-3:])[:200]}  # fmt: skip
            res["wall_seconds"] = round(time.time() - t, 1)
            probes.append(res)
            seen["outside"] = max(seen["outside"], res.get("outside") or 0)
            log(f"  [{time.strftime('%H:%M:%S')}] B={b} ({b * per_short + 1} blocks): "
                f"{'fits' if res['ok'] else res['error'][:120]}  [{res['wall_seconds']:.0f}s, "
                f"+{time.time() - t0:.0f}s]")  # fmt: skip
            out.append((res["ok"], res["error"] or "ok"))
        return out

    formula = formula_max_batch(plan)
    step = first_step(plan, formula)
    search: BatchSearch = search_max_batch(lambda b: fits_many([b])[0], plan.max_num_seqs, first=step,
                                           growth=ROW_GROWTH, max_tries=max_tries, width=width, fits_many=fits_many,
                                           gallop_down=True, gallop_up=True)  # fmt: skip
    report = batch_report(search, plan.max_num_seqs, seq_cost(plan))
    for row, res in zip(report["tries"], probes, strict=True):
        row.update({k: v for k, v in res.items() if k not in row})
    report.update(formula=formula, first_step=step, width=width, shortest=shortest, blocks_per_seq=per_short,
                  budget=plan.budget_bytes, outside_start=outside, outside_max=seen["outside"],
                  seconds=round(time.time() - t0, 1))  # fmt: skip
    return report
