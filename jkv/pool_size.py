"""How many KV blocks an engine allocates: the planner's answer for a byte budget, checked against the memory
JAX's pool has left before anything is allocated; off the GPU without a budget, a small default pool.

JAX allocates device memory from a pool of `XLA_PYTHON_CLIENT_MEM_FRACTION` of the card (0.75 by default), fixed
when the process starts. A plan for the whole card cannot fit inside that pool, and failing inside XLA's autotuner
after a 20 GB allocation is not an answer a user can act on, so the check runs first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import jax

from planner import PlanOptions, make_plan, parse_size
from kvspec.layout import blocks_for_tokens, kv_bytes_per_token, kv_dtype
from planner.units import human_bytes

log = logging.getLogger("jkv")

# Off the GPU without `hbm` or `num_blocks`: at most this many bytes of KV pool (the host's memory is shared with
# everything else, and XLA:CPU steps over a large pool are slow).
HOST_DEFAULT_POOL_BYTES = 256 * 2**20


@dataclass(frozen=True)
class DevicePool:
    """JAX's memory pool on one device: its size and what is in use now."""

    limit: int
    in_use: int

    @property
    def free(self) -> int:
        return self.limit - self.in_use


def device_pool(device: jax.Device | None = None) -> DevicePool | None:
    """JAX's pool on `device` (default: the first), or None where the backend reports no memory stats (CPU)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    return DevicePool(int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0)))


def _fraction_hint(pool: DevicePool, need: int) -> str:
    """The XLA_PYTHON_CLIENT_MEM_FRACTION that would give a pool of `need` free bytes, as a hint."""
    current = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    card = pool.limit / current
    want = min(0.99, (need + pool.in_use) / card + 0.01)
    return f"{want:.2f}" if want > current else "0.95"


def check_pool_fits(num_blocks: int, bytes_per_block: int) -> None:
    """Refuse, before allocating, a pool of `num_blocks` that JAX's pool has no room for (GPU only)."""
    pool = device_pool()
    need = num_blocks * bytes_per_block
    if pool is not None and need > pool.free:
        raise ValueError(
            f"num_blocks={num_blocks} needs {human_bytes(need)} of JAX's memory pool but it has {human_bytes(pool.free)} "
            f"free of {human_bytes(pool.limit)}: pass fewer blocks, hbm= to let the planner size the pool, or start "
            f"Python with XLA_PYTHON_CLIENT_MEM_FRACTION={_fraction_hint(pool, need)}."
        )


def planned_blocks(config, *, hbm, weight_dtype: str, kv: str, block_size: int, max_seq_len: int, max_num_seqs: int,
                   prefill_chunk: int, params_bytes: int, tp: int = 1):  # fmt: skip
    """(num_blocks, plan or None) for an engine; under tp-way tensor parallelism every figure (`hbm`,
    `params_bytes`, the plan's) is one device's.

    hbm: a byte budget (int or '24GB'); None plans against what JAX's pool has free on a GPU (the model's
    parameters, already resident, counted back in), and off the GPU gives a pool for max_num_seqs full-length
    sequences of at most HOST_DEFAULT_POOL_BYTES. Raises ValueError when JAX's pool cannot hold the plan.
    """
    pool = device_pool()
    if hbm is None and pool is None:
        per_seq = blocks_for_tokens(max_seq_len, block_size, config.sliding_window)
        per_block = block_size * kv_bytes_per_token(config, kv_dtype(kv), tp)
        want = max_num_seqs * per_seq + 1
        cap = max(per_seq + 1, HOST_DEFAULT_POOL_BYTES // per_block)
        if want > cap:
            log.info("jkv: off the GPU the default KV pool is %d blocks (%s; %d full-length sequences); pass "
                     "num_blocks= or hbm= for more.", cap, human_bytes(cap * per_block), (cap - 1) // per_seq)
        return min(want, cap), None
    # hbm=None budgets JAX's pool itself: what it has free plus the resident parameters, and no runtime reserve
    # (that memory lies outside the pool)
    budget = parse_size(hbm) if hbm is not None else pool.free + params_bytes
    plan = make_plan(
        config,
        PlanOptions(hbm_bytes=budget, dtype=weight_dtype, kv_dtype=kv, block_size=block_size, max_seq_len=max_seq_len,
                    max_num_seqs=max_num_seqs, prefill_chunk=prefill_chunk, reserve_bytes=None if hbm else 0, tp=tp),
    )  # fmt: skip
    if pool is not None:
        need = plan.peak_bytes - plan.reserve_bytes - params_bytes  # what the engine adds inside JAX's pool
        if need > pool.free:
            raise ValueError(
                f"the plan for hbm={hbm if hbm is not None else 'None'} needs {human_bytes(need)} of JAX's memory pool "
                f"(KV pool {human_bytes(plan.kv_pool_bytes)}, step workspace {human_bytes(plan.activation_bytes)}) "
                f"but the pool holds {human_bytes(pool.limit)} with {human_bytes(pool.free)} free: start Python with "
                f"XLA_PYTHON_CLIENT_MEM_FRACTION={_fraction_hint(pool, need)}, or pass hbm=None to plan against the "
                "pool JAX has."
            )
    return plan.layout.num_blocks, plan
