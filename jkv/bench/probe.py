"""`StepProbe`: an Engine's jitted steps run, lowered and compiled on synthetic inputs, in place on its pools.

Benchmarks and memory measurements need what an engine does not offer its users: one decode step (or one
multi-step decode call) of exactly the rows they choose, its compiled form (XLA's `memory_analysis()`, the HLO
text), the fused or unfused K/V write, the pool's size. This module is the only code outside the engine's own
modules that touches an Engine's internals (its pools, runner and block manager) or the engine-internal modules
(`jkv.engine`, `jkv.runner`): when those move, this file is what follows them.

`synthetic_inputs` is the one builder of such steps' inputs: rows of new tokens at a given context length, each
row on its own blocks of the pool (the K/V values do not matter for timing or memory).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import numpy as np

from jkv import engine as engine_mod
from jkv import runner as runner_mod

GENERATE_DECODE_STEPS: int = engine_mod.GENERATE_DECODE_STEPS  # decode steps per call jkv.generate runs
StepInputs = runner_mod.StepInputs
bucket = runner_mod.bucket


def attention_backend(name: str, head_dim: int, block_size: int, kv_dtype: str | None = None) -> str:
    """The attention backend `Engine(attention=name)` resolves to for this shape and page dtype."""
    return runner_mod.resolve_backend(name, head_dim, block_size, kv_dtype)


def synthetic_inputs(block_size: int, num_blocks: int, rows: int, context: int, *, chunk: int = 1, steps: int = 1,
                     exact_rows: bool = False, sampling: bool = False, share_blocks: bool = False) -> StepInputs:  # fmt: skip
    """A step of `rows` rows of `chunk` new tokens each, ending at `context` tokens (chunk=1: a decode step).

    Row r takes blocks 1 + r * per .. (r + 1) * per of the pool (per: the blocks `context + steps - 1` tokens
    need), so rows share none; a pool too small for that raises ValueError unless `share_blocks`, which wraps
    around the usable blocks instead (a memory measurement: the values do not matter). steps > 1: the inputs of
    a multi-step decode call whose rows each run `steps` steps from there. The batch is bucketed to a power of
    two as the engine's is (padding rows on the null block), or exactly `rows` with `exact_rows`. Greedy rows
    (temperature 0), or with `sampling` temperature 1, top-p 0.9 and seed r (the sampler's widest path).
    """
    if rows < 1 or context < chunk or chunk < 1 or steps < 1:
        raise ValueError(f"rows={rows}, chunk={chunk} and steps={steps} must be at least 1 and context={context} "
                         "at least chunk.")  # fmt: skip
    per = math.ceil((context + steps - 1) / block_size)
    usable = num_blocks - 1
    if rows * per > usable and not share_blocks:
        raise ValueError(f"the pool has {num_blocks} blocks; {rows} x {context} tokens need {rows * per + 1}.")
    temperature, top_k, top_p = (1.0, 0, 0.9) if sampling else (0.0, 0, 1.0)
    rows_in = [runner_mod.StepRow([1] * chunk, context - chunk, [1 + (r * per + i) % usable for i in range(per)],
                               temperature, top_k, top_p, r if sampling else 0, 0) for r in range(rows)]  # fmt: skip
    batch = rows if exact_rows else bucket(rows)
    x = runner_mod.build_inputs(rows_in, block_size=block_size, chunk=chunk, width=bucket(per), batch=batch)
    if steps > 1:
        x = dataclasses.replace(x, query_lens=np.where(np.arange(batch) < rows, steps, 0).astype(np.int32))
    return x


class StepProbe:
    """An engine's steps on inputs the caller chooses; every call updates the engine's pools in place (donated).

    Use it on an engine that is not serving: the probe's steps write K/V into whatever blocks the inputs name.
    """

    def __init__(self, engine: engine_mod.Engine) -> None:
        self.engine = engine
        self._tokens = None  # the token buffer threaded through this probe's multi-step calls

    # NOTE: the engine's internals, named here and nowhere else in jkv.bench: its step runner, its device pools
    # (read and replaced: every step donates them and returns the updated ones) and its block manager's pool size.
    @property
    def _runner(self) -> runner_mod.StepRunner:
        return self.engine.executor.runner

    @property
    def _pools(self):
        return self.engine.executor.kv.pools

    @_pools.setter
    def _pools(self, pools) -> None:
        self.engine.executor.kv.pools = pools

    # What the engine holds -------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.engine.block_size

    @property
    def num_blocks(self) -> int:
        """Blocks of the pool, the null block included."""
        return self.engine.manager.num_blocks

    @property
    def pool_bytes(self) -> int:
        """Device bytes of the K/V pools (scales included)."""
        return self._pools.nbytes

    @property
    def pool_shape(self) -> tuple[int, ...]:
        """Shape of one layer's K pool (a copy of a buffer this shape inside a step means the in-place update
        failed)."""
        return tuple(self._pools.k[0].shape)

    @property
    def backend(self) -> str:
        """The attention backend the engine's steps run ('pallas', 'reference', 'interpret')."""
        return self._runner.backend

    @property
    def fused_write(self) -> bool:
        """Whether a decode step writes the new K/V inside the attention kernel (True, the engine's default) or
        scatters it into the pools before the kernel (the older step; benchmarks compare the two)."""
        return self._runner.fuse_decode_write

    @fused_write.setter
    def fused_write(self, fused: bool) -> None:
        self._runner.fuse_decode_write = bool(fused)

    def inputs(self, rows: int, context: int, **options) -> StepInputs:
        """`synthetic_inputs` on this engine's pool (options: chunk, steps, exact_rows, sampling, share_blocks)."""
        return synthetic_inputs(self.block_size, self.num_blocks, rows, context, **options)

    # Running steps ---------------------------------------------------------------------------------------
    def run(self, x: StepInputs, *, decode: bool | None = None, greedy: bool = True) -> tuple[jax.Array, jax.Array]:
        """One step (decode by default when the rows have one token each); (tokens [B], logits [B, V]) on the
        device, nothing waited for."""
        decode = x.tokens.shape[1] == 1 if decode is None else decode
        toks, logits, self._pools = self._runner.run(self._pools, x, decode=decode, greedy=greedy)
        return toks, logits

    def run_decode_steps(self, x: StepInputs, num_steps: int, *, greedy: bool = True) -> jax.Array:
        """One multi-step decode call (`Engine(decode_steps=num_steps)`'s); tokens [num_steps, B] on the device."""
        r = self._runner
        buf = self._tokens if self._tokens is not None else r.zero_tokens()
        toks, self._pools, self._tokens = r.run_decode_steps(self._pools, x, buf, num_steps=num_steps, greedy=greedy)
        return toks

    def synchronize(self) -> None:
        """Block until the pools (and anything the engine launched) are ready."""
        self.engine.synchronize()

    # Compiled steps --------------------------------------------------------------------------------------
    def lower(self, x: StepInputs, *, decode: bool | None = None, greedy: bool = True, num_steps: int | None = None):
        """The lowered step (num_steps: the multi-step decode call instead), as the engine would run it."""
        decode = x.tokens.shape[1] == 1 if decode is None else decode
        return self._runner.lower(self._pools, x, decode=decode, greedy=greedy, num_steps=num_steps)

    def compile(self, x: StepInputs, **options):
        """The compiled step (`lower`'s options); compiling runs XLA's GEMM autotuner for its shapes."""
        return self.lower(x, **options).compile()

    def memory_analysis(self, x: StepInputs, **options) -> dict[str, int]:
        """XLA's accounting of the compiled step: temp, output, alias (outputs sharing the donated pools'
        buffers) and argument bytes."""
        ma = self.compile(x, **options).memory_analysis()
        return {"temp": int(ma.temp_size_in_bytes), "output": int(ma.output_size_in_bytes),
                "alias": int(ma.alias_size_in_bytes), "argument": int(ma.argument_size_in_bytes)}  # fmt: skip

    def dispatch_calls(self, x: StepInputs, num_steps: int) -> dict[str, Callable[[], jax.Array]]:
        """Zero-argument calls of the greedy multi-step decode on `x`, each returning its tokens without waiting:
        the engine's path (NumPy inputs, pools donated), the same with the inputs already on the device, and a
        jit that does not donate the pools (its pool updates are dropped). For timing how long a dispatch holds
        the calling thread."""
        r = self._runner
        ints, floats = runner_mod.pack(x)
        ints_d, floats_d = jax.device_put(ints), jax.device_put(floats)
        r.use_pools(self._pools)
        donating = r.function(x, decode=True, greedy=True, num_steps=num_steps)
        plain = jax.jit(partial(runner_mod._decode_steps, shape=r._shape(x), num_steps=num_steps,
                                block_size=r.block_size, config=r.config, backend=r.backend, greedy=True,
                                window=r.window, fuse_write=r.fuse_decode_write))  # fmt: skip
        state = {"buf": r.zero_tokens()}

        def call(fn, i, fl, donate: bool) -> jax.Array:
            toks, pools, state["buf"] = fn(r.params, self._pools, i, fl, state["buf"])
            if donate:
                self._pools = pools
            return toks

        return {"engine path (NumPy inputs, donated pools)": partial(call, donating, ints, floats, True),
                "inputs already on the device, donated pools": partial(call, donating, ints_d, floats_d, True),
                "inputs on the device, pools not donated": partial(call, plain, ints_d, floats_d, False)}  # fmt: skip
