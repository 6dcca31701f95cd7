"""Device side of the engine: the jitted model steps over the paged KV pools, with static, bucketed shapes.

A step runs `B` rows of `C` query tokens each (decode: C == 1) through the model; every layer first scatters the
rows' new K/V into the pools, then attends over the rows' block tables with the paged attention kernel (or its
pure-`jnp` reference). A decode step over float pools with the Pallas kernels does both in one kernel per layer
(`paged_decode_attention_write`), which also reads q, k and v out of the QKV projection's output. The pools are
donated, so XLA writes them in place. Shapes are bucketed to powers of two (rows, chunk length, block-table
width), which bounds the number of compilations: `StepRunner.compiled` counts them. `run_decode_steps` runs K
decode steps in one call (multi-step decode: a `fori_loop` over the step, sampled tokens fed back on the device).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from jkv.compile_cache import StoredFunction
from jkv.kv_cache import KVPools, write_tokens
from jkv.model import forward
from jkv.sampling import sample_tokens, token_logprobs
from jkv.sharding import HEADS, POOL, StepChannel, TensorParallel
from kvspec.shapes import bucket  # noqa: F401 - re-exported for callers of the runner
from kvspec.config import ModelConfig


_compilations = 0  # XLA backend compilations in this process (jax.monitoring), for per-engine counts


def _count_compilation(event: str, duration_secs: float, **kwargs) -> None:
    global _compilations
    if event == "/jax/core/compile/backend_compile_duration":
        _compilations += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def compilations() -> int:
    """XLA compilations so far in this process (a caller takes differences around its own calls)."""
    return _compilations


class StepRow(NamedTuple):
    """One row of a step: its new tokens, the tokens already cached before them, its block table, and the
    sampling parameters of the token it samples (its seed, and its index among the request's output tokens)."""

    tokens: list[int]
    context_len: int
    block_table: list[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    counter: int


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInputs:
    """Inputs of one step (all int32 unless noted); padding rows/tokens point at the null block.

    Built on the host as NumPy arrays, sent packed (`pack`) and rebuilt inside the jitted step (`unpack`).
    """

    tokens: jax.Array  # [B, C]
    positions: jax.Array  # [B, C]
    slot_blocks: jax.Array  # [B, C] physical block each new token's K/V goes to
    slot_offsets: jax.Array  # [B, C] slot within that block
    block_tables: jax.Array  # [B, M]
    context_lens: jax.Array  # [B] tokens already in the pages before this step
    query_lens: jax.Array  # [B] valid query tokens of the row (0 for padding rows)
    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B]
    top_p: jax.Array  # [B] float32
    seeds: jax.Array  # [B] uint32
    counters: jax.Array  # [B] index of the token being sampled within its request
    src_rows: jax.Array  # [B] decode: >= 0 takes the row's token from the previous step's token buffer there


def resolve_backend(name: str, head_dim: int, block_size: int, kv_dtype: str | None = None) -> str:
    """'auto' -> 'pallas' on a GPU when the kernels take this shape and page dtype, else the pure-jnp 'reference'.

    Every page dtype the engine stores (int4 included) is served by the kernels; float8_e4m3fn pages need sm89 or
    newer, so on older GPUs 'auto' picks the reference for them (an explicit 'pallas' fails with a clear message).
    """
    if name not in ("auto", "pallas", "reference", "interpret"):
        raise ValueError(f"attention={name!r} is unknown: use 'auto', 'pallas', 'reference' or 'interpret'.")
    if name != "auto":
        return name
    from pallas_kernels.common import HEAD_DIMS, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, check_backend_support

    if jax.default_backend() != "gpu":
        return "reference"
    fits = head_dim in HEAD_DIMS and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
    if fits and kv_dtype == "float8_e4m3fn":
        try:
            check_backend_support(jnp.dtype(jnp.float8_e4m3fn), interpret=False)
        except ValueError:
            fits = False
    return "pallas" if fits else "reference"


def attention_backend(name: str):
    """(decode_fn, prefill_fn, decode_write_fn) for 'pallas', 'reference' or 'interpret' (Pallas kernels
    interpreted on CPU). decode_write_fn writes the current token's K/V and attends in one call (float pools); None
    for 'reference', whose decode step scatters first and then attends, as its prefill does."""
    if name == "pallas":
        from pallas_kernels.paged_decode import paged_decode_attention as decode
        from pallas_kernels.paged_decode import paged_decode_attention_write as decode_write
        from pallas_kernels.paged_prefill import paged_prefill_attention as prefill
    elif name == "reference":
        from pallas_kernels.paged_decode import paged_decode_attention_reference as decode
        from pallas_kernels.paged_prefill import paged_prefill_attention_reference as prefill

        decode_write = None
    elif name == "interpret":
        from pallas_kernels.paged_decode import paged_decode_attention, paged_decode_attention_write
        from pallas_kernels.paged_prefill import paged_prefill_attention

        decode = partial(paged_decode_attention, interpret=True)
        decode_write = partial(paged_decode_attention_write, interpret=True)
        prefill = partial(paged_prefill_attention, interpret=True)
    else:
        raise ValueError(f"attention={name!r} is unknown: use 'auto', 'pallas', 'reference' or 'interpret'.")
    return decode, prefill, decode_write


_INT_FIELDS = ("tokens", "positions", "slot_blocks", "slot_offsets", "block_tables", "context_lens", "query_lens",
               "top_k", "seeds", "counters", "src_rows")  # fmt: skip


def pack(x: StepInputs) -> tuple[np.ndarray, np.ndarray]:
    """All integer inputs in one int32 vector and the floats in another: two host->device copies per step."""
    ints = np.concatenate([np.asarray(getattr(x, f)).astype(np.uint32).view(np.int32).ravel() if f == "seeds"
                           else np.asarray(getattr(x, f), np.int32).ravel() for f in _INT_FIELDS])  # fmt: skip
    floats = np.concatenate([np.asarray(x.temperature, np.float32), np.asarray(x.top_p, np.float32)])
    return ints, floats


def unpack(ints: jax.Array, floats: jax.Array, b: int, c: int, m: int) -> StepInputs:
    sizes = {"tokens": b * c, "positions": b * c, "slot_blocks": b * c, "slot_offsets": b * c, "block_tables": b * m}
    shapes = {"tokens": (b, c), "positions": (b, c), "slot_blocks": (b, c), "slot_offsets": (b, c),
              "block_tables": (b, m)}  # fmt: skip
    out, at = {}, 0
    for f in _INT_FIELDS:
        n = sizes.get(f, b)
        out[f] = ints[at : at + n].reshape(shapes.get(f, (b,)))
        at += n
    out["seeds"] = jax.lax.bitcast_convert_type(out["seeds"], jnp.uint32)
    out["temperature"], out["top_p"] = floats[:b], floats[b:]
    return StepInputs(**out)


def _forward_sample(params, pools: KVPools, x: StepInputs, tokens_in, *, config, backend, decode, greedy, window,
                    fuse_write, tp: TensorParallel, all_positions=False):  # fmt: skip
    """The model over `x` with input tokens `tokens_in` [B, C], then one sampled token per row.

    The attention runs per shard of `tp`'s mesh (`jax.shard_map`): each device writes and reads its own KV heads
    with its own query heads; `x` (block tables, lengths, slots) is the same on every device.
    Returns (tokens [B] int32, logits [B, V] float32, pools), and with `all_positions` also every position's
    logits [B, C, V] float32."""
    decode_fn, prefill_fn, decode_write_fn = attention_backend(backend)
    heads = config.n_head // tp.size  # query heads per shard

    def shard_attend(q, k, v, cache: KVPools, x: StepInputs):  # one shard's heads, one layer's pools
        b, c, hkv, d = k.shape
        cache = write_tokens(
            cache, 0, k.reshape(b * c, hkv, d), v.reshape(b * c, hkv, d),
            x.slot_blocks.reshape(-1), x.slot_offsets.reshape(-1),
        )  # fmt: skip
        kp, vp, ks, vs = cache.layer(0)
        if decode:
            out = decode_fn(q[:, 0], kp, vp, x.block_tables, x.context_lens + x.query_lens,
                            k_scales=ks, v_scales=vs, sliding_window=window)[:, None]  # fmt: skip
        else:
            out = prefill_fn(q, kp, vp, x.block_tables, x.context_lens, x.query_lens,
                             k_scales=ks, v_scales=vs, sliding_window=window)  # fmt: skip
        return out.astype(q.dtype), cache  # [B, C, H / N, D]

    def shard_attend_qkv(qkv, cache: KVPools, x: StepInputs):
        # One kernel per layer writes the token's K/V and attends, reading q/k/v straight from the projection.
        kp, vp, _, _ = cache.layer(0)
        out, kp, vp = decode_write_fn(qkv[:, 0], kp, vp, x.block_tables, x.context_lens + x.query_lens,
                                      num_heads=heads, sliding_window=window)  # fmt: skip
        return out[:, None].astype(qkv.dtype), cache.with_layer(0, kp, vp)  # [B, 1, H / N, D]

    per_shard = tp.per_shard(shard_attend, (HEADS, HEADS, HEADS, POOL, P()), (HEADS, POOL))
    per_shard_qkv = tp.per_shard(shard_attend_qkv, (HEADS, POOL, P()), (HEADS, POOL))

    def attend(layer, q, k, v, cache):
        out, mine = per_shard(q, k, v, cache.only_layer(layer), x)
        return out, cache.with_layer(layer, *mine.layer(0))  # [B, C, H, D]

    def attend_qkv(layer, qkv, k, v, cache):
        del k, v
        out, mine = per_shard_qkv(qkv, cache.only_layer(layer), x)
        return out, cache.with_layer(layer, *mine.layer(0))  # [B, 1, H, D]

    attend_qkv.takes_qkv = True
    if fuse_write and decode and decode_write_fn is not None and not pools.quantized:
        attend = attend_qkv
    last = jnp.maximum(x.query_lens - 1, 0)
    if all_positions:
        full, pools = forward(params, config, tokens_in, x.positions, pools, attend, mesh=tp.mesh)  # [B, C, V]
        full = tp.constrain(full.astype(jnp.float32), tp.replicated)
        logits = jnp.take_along_axis(full, last[:, None, None], axis=1)[:, 0]  # [B, V]
    else:
        logits, pools = forward(params, config, tokens_in, x.positions, pools, attend, logits_index=last,
                                mesh=tp.mesh)  # [B, V]  # fmt: skip
        logits = logits.astype(jnp.float32)
    logits = tp.constrain(logits, tp.replicated)  # the vocab-parallel head's logits, gathered for sampling
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        tokens = sample_tokens(logits, x.temperature, x.top_k, x.top_p, x.seeds, x.counters)
    pools = tp.constrain(pools, tp.pools)
    return (tokens, logits, pools, full) if all_positions else (tokens, logits, pools)


def _decode_tokens_in(x: StepInputs, prev):
    """A decode step's input tokens [B, 1]: a row with src_rows >= 0 reads its token from `prev` there."""
    if prev is None:
        return x.tokens
    from_prev = prev[jnp.maximum(x.src_rows, 0)][:, None]  # [B, 1]
    return jnp.where(x.src_rows[:, None] >= 0, from_prev, x.tokens)


def _step(params, pools: KVPools, ints, floats, prev, *, shape, config, backend, decode, greedy, window, fuse_write,
          tp):  # fmt: skip
    """One model step. `prev` (int32 [S] or None) is the token buffer of the previous step: a decode row with
    src_rows >= 0 reads its input token there instead of from `tokens`, so the host need not have seen it.
    Returns the buffer with this step's sampled tokens written at [0, B) (decode) or [S/2, S/2 + B) (prefill).
    """
    x = unpack(ints, floats, *shape)
    tokens_in = _decode_tokens_in(x, prev) if decode else x.tokens
    tokens, logits, pools = _forward_sample(params, pools, x, tokens_in, config=config, backend=backend,
                                            decode=decode, greedy=greedy, window=window, fuse_write=fuse_write,
                                            tp=tp)  # fmt: skip
    if prev is None:
        return tokens, logits, pools, None
    offset = 0 if decode else prev.shape[0] // 2
    return tokens, logits, pools, jax.lax.dynamic_update_slice(prev, tokens, (offset,))


def _scoring_step(params, pools: KVPools, ints, floats, prev, targets, *, shape, config, backend, greedy, window,
                  tp):  # fmt: skip
    """A prefill step (as `_step`) that also scores `targets` [B, C] (int32, < 0: nothing) at every position:
    returns `_step`'s four results and (target log-probabilities [B, C], top values and ids [B, C, K])."""
    x = unpack(ints, floats, *shape)
    tokens, logits, pools, full = _forward_sample(params, pools, x, x.tokens, config=config, backend=backend,
                                                  decode=False, greedy=greedy, window=window, fuse_write=False,
                                                  tp=tp, all_positions=True)  # fmt: skip
    scored = token_logprobs(full, targets)
    if prev is None:
        return tokens, logits, pools, None, scored
    return tokens, logits, pools, jax.lax.dynamic_update_slice(prev, tokens, (prev.shape[0] // 2,)), scored


def _decode_steps(params, pools: KVPools, ints, floats, prev, *, shape, num_steps, block_size, config, backend, greedy,
                  window, fuse_write, tp):  # fmt: skip
    """`num_steps` decode steps in one call, each step's sampled tokens feeding the next (multi-step decode).

    `x` describes the first step as for `_step`, except that `query_lens[b]` is the number of steps row b runs
    (0 .. num_steps): step j of row b is at position `positions[b] + j`, its K/V slot comes from its block table
    (which must already hold the blocks for all its steps), and its sampling counter is `counters[b] + j`.
    Rows past their last step become padding (length 0: they write and sample nothing that is kept).
    Returns (tokens [num_steps, B] int32, pools, token buffer with each row's last sampled token at row b).
    """
    x = unpack(ints, floats, *shape)
    b, bs = shape[0], block_size
    steps = x.query_lens
    rows = jnp.arange(b)

    def one(j, carry):
        pools, tokens_in, out = carry
        active = j < steps  # [B]
        pos = x.positions[:, 0] + j
        block = x.block_tables[rows, jnp.minimum(pos // bs, x.block_tables.shape[1] - 1)]
        xj = dataclasses.replace(
            x, positions=pos[:, None], slot_blocks=jnp.where(active, block, 0)[:, None],
            slot_offsets=(pos % bs)[:, None], context_lens=jnp.where(active, x.context_lens + j, 0),
            query_lens=active.astype(jnp.int32), counters=x.counters + j,
        )  # fmt: skip
        tokens, _, pools = _forward_sample(params, pools, xj, tokens_in, config=config, backend=backend,
                                           decode=True, greedy=greedy, window=window, fuse_write=fuse_write,
                                           tp=tp)  # fmt: skip
        tokens = jnp.where(active, tokens, tokens_in[:, 0])  # a finished row keeps its last token
        return pools, tokens[:, None], out.at[j].set(tokens)

    out = jnp.zeros((num_steps, b), jnp.int32)
    pools, last, out = jax.lax.fori_loop(0, num_steps, one, (pools, _decode_tokens_in(x, prev), out))
    buf = None if prev is None else jax.lax.dynamic_update_slice(prev, last[:, 0], (0,))
    return out, pools, buf


_JITTED: OrderedDict[tuple, object] = OrderedDict()  # least recently used first
_JITTED_MAX = 128  # entries kept for reuse (each holds its executables); live runners keep their own anyway


def _cached_jit(key: tuple, fn):
    """jax.jit(fn, donating the pools) for `key`, kept in the process-wide LRU `_JITTED` (made on first use); its
    executables are loaded from, and stored in, the active compile cache (jkv.compile_cache)."""
    if key in _JITTED:
        _JITTED.move_to_end(key)
    else:
        while len(_JITTED) >= _JITTED_MAX:
            _JITTED.popitem(last=False)
        tp = key[-1]  # every step's key ends with its mesh
        _JITTED[key] = StoredFunction(repr(key), fn(), donate_argnums=1, devices=tp.mesh.devices.flat)
    return _JITTED[key]


def _jitted_step(config: ModelConfig, backend: str, decode: bool, greedy: bool, shape: tuple[int, int, int],
                 window: int | None, fuse_write: bool, tp: TensorParallel):  # fmt: skip
    """The jitted step for one static configuration, shared by every runner of the process.

    Parameters, pools and inputs are arguments, so engines over the same model shape (a restarted engine, the
    tests' many small engines) reuse the compiled executables; JAX still compiles once per argument shapes and
    dtypes (a different kv_dtype or token buffer size is a different executable). At most _JITTED_MAX are
    kept for reuse, so a process that meets many model shapes does not hold every executable forever.
    """
    key = (config, backend, decode, greedy, shape, window, fuse_write, tp)
    return _cached_jit(key, lambda: partial(_step, shape=shape, config=config, backend=backend, decode=decode,
                                            greedy=greedy, window=window, fuse_write=fuse_write, tp=tp))  # fmt: skip


def _jitted_decode_steps(config: ModelConfig, backend: str, greedy: bool, shape: tuple[int, int, int],
                         window: int | None, fuse_write: bool, num_steps: int, block_size: int,
                         tp: TensorParallel):  # fmt: skip
    """The jitted multi-step decode (`_decode_steps`) for one static configuration, cached like `_jitted_step`."""
    key = ("steps", config, backend, greedy, shape, window, fuse_write, num_steps, block_size, tp)
    return _cached_jit(key, lambda: partial(_decode_steps, shape=shape, num_steps=num_steps, block_size=block_size,
                                            config=config, backend=backend, greedy=greedy, window=window,
                                            fuse_write=fuse_write, tp=tp))  # fmt: skip


def _jitted_scoring_step(config: ModelConfig, backend: str, greedy: bool, shape: tuple[int, int, int],
                         window: int | None, tp: TensorParallel):  # fmt: skip
    """The jitted prefill-with-scores step (`_scoring_step`) for one static configuration, cached like `_jitted_step`."""
    key = ("scoring", config, backend, greedy, shape, window, tp)
    return _cached_jit(key, lambda: partial(_scoring_step, shape=shape, config=config, backend=backend,
                                            greedy=greedy, window=window, tp=tp))  # fmt: skip


class StepRunner:
    """Compiles and runs the model step for each (kind, bucket) shape; counts compilations.

    token_slots > 0 threads an int32 token buffer of that size through the steps (`run_step`): decode rows
    take up to token_slots / 2 rows at its front, prefill rows as many at its back. The engine's async
    scheduling feeds a decode row the previous step's sampled token from it without a device->host read.
    fuse_decode_write=False keeps the separate K/V scatter before the decode kernel (benchmarks compare the two).
    """

    def __init__(self, params, config: ModelConfig, *, block_size: int, backend: str = "auto",
                 sliding_window: int | None = None, token_slots: int = 0, fuse_decode_write: bool = True,
                 tp: TensorParallel | None = None):  # fmt: skip
        """tp: the mesh `params` are placed on (`TensorParallel.place_params`) and `config` is its
        `model_config`; None: a one-device mesh over the default device."""
        if token_slots < 0 or token_slots % 2:
            raise ValueError(f"token_slots={token_slots} must be an even number >= 0.")
        self.token_slots = token_slots
        self._zero_tokens = None
        self.params = params
        self.config = config
        self.tp = tp if tp is not None else TensorParallel.create(config, 1)
        self.channel: StepChannel | None = None  # process 0 of several: each device call is broadcast first
        self.block_size = block_size
        self.requested_backend = backend
        self.backend = resolve_backend(backend, config.head_dim, block_size)  # refined by the pools' kind in run()
        self.window = sliding_window
        self.fuse_decode_write = fuse_decode_write
        self._fns: dict = {}
        self.compiled: set[tuple] = set()

    def use_pools(self, pools: KVPools) -> None:
        """Resolve 'auto' against the pools' page kind (int4 pages -> 'reference'); cheap after the first call."""
        backend = resolve_backend(self.requested_backend, self.config.head_dim, self.block_size, pools.kind)
        if backend != self.backend:
            self.backend = backend
            self._fns.clear()

    def _compiled_key(self, decode: bool, greedy: bool, shape: tuple[int, int, int], num_steps: int | None) -> tuple:
        """The entry of `compiled` for a step (num_steps: the multi-step decode) on the current backend."""
        if num_steps is not None:
            return (self.backend, "steps", greedy, shape, num_steps)
        return (self.backend, decode, greedy, shape)

    def _fn(self, decode: bool, greedy: bool, shape: tuple[int, int, int]):
        fn_key = (decode, greedy, shape, self.fuse_decode_write)
        if fn_key not in self._fns:
            self._fns[fn_key] = _jitted_step(self.config, self.backend, decode, greedy, shape, self.window,
                                             self.fuse_decode_write, self.tp)  # fmt: skip
            self.compiled.add(self._compiled_key(decode, greedy, shape, None))
        return self._fns[fn_key]

    @staticmethod
    def _shape(inputs: StepInputs) -> tuple[int, int, int]:
        b, c = inputs.tokens.shape
        return b, c, inputs.block_tables.shape[1]

    def zero_tokens(self) -> jax.Array | None:
        """A token buffer of zeros (None without one)."""
        if self.token_slots and self._zero_tokens is None:
            self._zero_tokens = jnp.zeros(self.token_slots, jnp.int32, device=self.tp.replicated)
        return self._zero_tokens

    def close(self) -> None:
        """Free the runner's device buffer (its zero token buffer) and forget its jitted steps."""
        if self._zero_tokens is not None and not self._zero_tokens.is_deleted():
            self._zero_tokens.delete()
        self._zero_tokens = None
        self._fns.clear()

    def run(self, pools: KVPools, inputs: StepInputs, *, decode: bool, greedy: bool):
        """Run one step; returns (next tokens [B] int32, logits [B, V] float32, new pools), all on the device."""
        return self.run_step(pools, inputs, self.zero_tokens(), decode=decode, greedy=greedy)[:3]

    def run_step(self, pools: KVPools, inputs: StepInputs, prev_tokens: jax.Array | None, *, decode: bool,
                 greedy: bool):  # fmt: skip
        """Run one step, decode rows taking their token from `prev_tokens` where `inputs.src_rows` says so.

        Returns (tokens [B], logits [B, V], new pools, new token buffer or None), all on the device; nothing
        waits for the device.
        """
        ints, floats = self._prepare(pools, inputs, prev_tokens)
        shape = self._shape(inputs)
        if self.channel is not None:
            self.channel.send("step", (decode, greedy, *shape), (ints, floats))
        tokens, logits, pools, buf = self._fn(decode, greedy, shape)(self.params, pools, *self.tp.inputs(ints, floats),
                                                                     prev_tokens)  # fmt: skip
        return self.tp.local(tokens), self.tp.local(logits), pools, buf

    def run_scoring_step(self, pools: KVPools, inputs: StepInputs, prev_tokens: jax.Array | None, targets, *,
                         greedy: bool):  # fmt: skip
        """A prefill step that also scores `targets` [B, C] (the next prompt token at each position, < 0 for
        none): `run_step`'s results and (log-probabilities [B, C], top values [B, C, K], top ids [B, C, K])."""
        ints, floats = self._prepare(pools, inputs, prev_tokens)
        targets = np.asarray(targets, np.int32)
        shape = self._shape(inputs)
        if self.channel is not None:
            self.channel.send("scoring", (greedy, *shape), (ints, floats, targets.ravel()))
        tokens, logits, pools, buf, scored = self._scoring_fn(greedy, shape)(
            self.params, pools, *self.tp.inputs(ints, floats), prev_tokens, *self.tp.inputs(targets))  # fmt: skip
        return self.tp.local(tokens), self.tp.local(logits), pools, buf, tuple(self.tp.local(a) for a in scored)

    def _scoring_fn(self, greedy: bool, shape: tuple[int, int, int]):
        self.compiled.add((self.backend, "scoring", greedy, shape))
        return _jitted_scoring_step(self.config, self.backend, greedy, shape, self.window, self.tp)

    def _prepare(self, pools: KVPools, inputs: StepInputs, prev_tokens: jax.Array | None):
        """Check the token buffer against the rows, resolve the backend for the pools; the packed inputs."""
        assert (prev_tokens is None) == (self.token_slots == 0), "a token buffer exactly when token_slots > 0"
        assert not self.token_slots or inputs.tokens.shape[0] <= self.token_slots // 2, "more rows than slots"
        self.use_pools(pools)
        return pack(inputs)

    def _steps_fn(self, greedy: bool, shape: tuple[int, int, int], num_steps: int):
        key = ("steps", greedy, shape, num_steps, self.fuse_decode_write)
        if key not in self._fns:
            self._fns[key] = _jitted_decode_steps(self.config, self.backend, greedy, shape, self.window,
                                                  self.fuse_decode_write, num_steps, self.block_size, self.tp)  # fmt: skip
            self.compiled.add(self._compiled_key(True, greedy, shape, num_steps))
        return self._fns[key]

    def run_decode_steps(self, pools: KVPools, inputs: StepInputs, prev_tokens: jax.Array | None, *,
                         num_steps: int, greedy: bool):  # fmt: skip
        """Run `num_steps` decode steps in one device call (see `_decode_steps`: `inputs.query_lens[b]` is the
        number of steps row b runs). Returns (tokens [num_steps, B], new pools, new token buffer or None), all on
        the device; nothing waits for the device."""
        ints, floats = self._prepare(pools, inputs, prev_tokens)
        shape = self._shape(inputs)
        if self.channel is not None:
            self.channel.send("steps", (greedy, num_steps, *shape), (ints, floats))
        steps, pools, buf = self._steps_fn(greedy, shape, num_steps)(self.params, pools, *self.tp.inputs(ints, floats),
                                                                     prev_tokens)  # fmt: skip
        return self.tp.local(steps), pools, buf

    def replay(self, op: str, statics: tuple[int, ...], arrays: list[np.ndarray], pools: KVPools, prev_tokens):
        """Make the device call process 0 announced (`StepChannel`), on this process's shards; returns the new
        (pools, token buffer). Nothing is read back."""
        if op == "step":
            decode, greedy, *shape = statics
            out = self._fn(bool(decode), bool(greedy), tuple(shape))(self.params, pools, *self.tp.inputs(*arrays),
                                                                     prev_tokens)  # fmt: skip
        elif op == "scoring":
            greedy, *shape = statics
            ints, floats, targets = arrays
            targets = targets.reshape(shape[0], shape[1])
            out = self._scoring_fn(bool(greedy), tuple(shape))(
                self.params, pools, *self.tp.inputs(ints, floats), prev_tokens, *self.tp.inputs(targets))  # fmt: skip
        elif op == "steps":
            greedy, num_steps, *shape = statics
            out = (None, *self._steps_fn(bool(greedy), tuple(shape), num_steps)(
                self.params, pools, *self.tp.inputs(*arrays), prev_tokens))  # fmt: skip
        else:
            raise AssertionError(f"not a step call: {op!r}")
        return out[2], out[3]

    def is_compiled(self, inputs: StepInputs, *, decode: bool, greedy: bool, num_steps: int | None = None) -> bool:
        """Whether this runner already runs the step (or the multi-step decode, num_steps) of `inputs`' shape."""
        return self._compiled_key(decode, greedy, self._shape(inputs), num_steps) in self.compiled

    def function(self, inputs: StepInputs, *, decode: bool, greedy: bool, num_steps: int | None = None):
        """The jitted step (num_steps: the multi-step decode) for `inputs`' shape, made on first use; called as
        fn(params, pools, *pack(inputs), token buffer). Resolve the backend first (`use_pools`)."""
        if num_steps is not None:
            return self._steps_fn(greedy, self._shape(inputs), num_steps)
        return self._fn(decode, greedy, self._shape(inputs))

    def lower(self, pools: KVPools, inputs: StepInputs, *, decode: bool, greedy: bool = True,
              num_steps: int | None = None):  # fmt: skip
        """The lowered step (for `.compile().memory_analysis()`); num_steps: the multi-step decode instead."""
        self.use_pools(pools)
        fn = self.function(inputs, decode=decode, greedy=greedy, num_steps=num_steps)
        return fn.lower(self.params, pools, *self.tp.inputs(*pack(inputs)), self.zero_tokens())


def build_inputs(
    rows: Sequence[StepRow],
    *,
    block_size: int,
    chunk: int,
    width: int,
    batch: int,
    src_rows: Sequence[int] | None = None,
) -> StepInputs:
    """Pack `StepRow`s into arrays.

    `chunk`, `width` and `batch` are the bucketed C, M and B; padding goes to the null block 0. Rows of one token
    each (decode) take a column-wise path: one NumPy conversion per field instead of several per row.
    `src_rows` (decode): per row, the index in the previous step's token buffer holding the row's token, or -1
    (default) for the row's own token.
    """
    n = len(rows)
    tables = np.zeros((batch, width), np.int32)
    src = _column(src_rows if src_rows is not None else [], batch, np.int32, fill=-1)
    if chunk == 1 and all(len(r[0]) == 1 for r in rows):
        news, ctx_l, tabs, temp_l, k_l, p_l, seed_l, count_l = zip(*rows) if rows else ([],) * 8
        for r, tab in enumerate(tabs):
            tables[r, : len(tab)] = tab
        ctx = _column(ctx_l, batch, np.int32)
        tokens = _column([x[0] for x in news], batch, np.int32)[:, None]
        positions = ctx[:, None].copy()
        slot_blocks = _column([tab[c // block_size] for tab, c in zip(tabs, ctx_l)], batch, np.int32)[:, None]
        slot_offsets = positions % block_size
        qlen = _column([1] * n, batch, np.int32)
        temp = _column(temp_l, batch, np.float32)
        top_k = _column(k_l, batch, np.int32)
        top_p = _column(p_l, batch, np.float32, fill=1.0)
        seeds = (_column(seed_l, batch, np.int64) & 0xFFFFFFFF).astype(np.uint32)
        counters = _column(count_l, batch, np.int32)
        return StepInputs(tokens, positions, slot_blocks, slot_offsets, tables, ctx, qlen, temp, top_k, top_p, seeds,
                          counters, src)  # fmt: skip
    tokens = np.zeros((batch, chunk), np.int32)
    positions = np.zeros((batch, chunk), np.int32)
    slot_blocks = np.zeros((batch, chunk), np.int32)
    slot_offsets = np.zeros((batch, chunk), np.int32)
    ctx = np.zeros(batch, np.int32)
    qlen = np.zeros(batch, np.int32)
    temp = np.zeros(batch, np.float32)
    top_k = np.zeros(batch, np.int32)
    top_p = np.ones(batch, np.float32)
    seeds = np.zeros(batch, np.uint32)
    counters = np.zeros(batch, np.int32)
    for r, (new, context_len, table, t, k, p, seed, counter) in enumerate(rows):
        n = len(new)
        pos = np.arange(context_len, context_len + n)
        tokens[r, :n] = new
        positions[r, :n] = pos
        tab = np.asarray(table, np.int32)
        tables[r, : len(tab)] = tab
        slot_blocks[r, :n] = tab[pos // block_size]
        slot_offsets[r, :n] = pos % block_size
        ctx[r], qlen[r] = context_len, n
        temp[r], top_k[r], top_p[r], seeds[r], counters[r] = t, k, p, seed & 0xFFFFFFFF, counter
    return StepInputs(tokens, positions, slot_blocks, slot_offsets, tables, ctx, qlen, temp, top_k, top_p, seeds,
                      counters, src)  # fmt: skip


def _column(values, batch: int, dtype, fill=0) -> np.ndarray:
    """`values` as a [batch] array, padded with `fill`."""
    out = np.full(batch, fill, dtype)
    out[: len(values)] = values
    return out
