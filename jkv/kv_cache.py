"""The paged KV cache on the device: K/V block pools, writes of new tokens, block copies and swaps.

`KVPools` is a pytree of the preallocated pools, laid out as kvspec/layout.py says:

    k, v:               n_layer arrays of [num_blocks, kv_heads, block_size, head_dim]   (storage dtype)
    k_scale, v_scale:   n_layer arrays of [num_blocks, kv_heads, block_size]             (float16; int8 / fp8)

int4 pools pack two signed 4-bit values per byte (layout in `pallas_kernels/common.py`):

    k, v:               n_layer arrays of [num_blocks, kv_heads, block_size, head_dim // 2]   uint8
    k_scale, v_scale:   n_layer arrays of [num_blocks, kv_heads, block_size, head_dim // 32]  float16

One array per layer (the planner's `layer_pool_shape`), so a kernel reads a layer's pool as a whole buffer and
never forces XLA to slice a copy out of a stacked array.

The pools are allocated once and then only ever passed into jitted functions that donate them and return the
updated pools, so XLA updates them in place (no second pool exists at any time). Block 0 is the null block:
padding entries of block tables and padding tokens of a batch point at it; its contents are garbage by design.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jkv.compile_cache import StoredFunction
from pallas_kernels.common import INT4_PAGE_DTYPE, dequantize_int4, int4_groups, quantize_int4
from kvspec.config import ModelConfig
from kvspec.shapes import bucket, cdiv
from kvspec.layout import BlockLayout

FLOAT_KV = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
QUANT_KV = {"int8": (jnp.int8, 127.0), "float8_e4m3fn": (jnp.float8_e4m3fn, 448.0)}
INT4 = "int4"  # packed: uint8 pages of head_dim // 2, float16 scales per 32 elements
SCALE_DTYPE = jnp.float16


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVPools:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    k_scale: tuple[jax.Array, ...] | None = None
    v_scale: tuple[jax.Array, ...] | None = None

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def kind(self) -> str:
        """The kv dtype name: 'bfloat16', 'float32', 'float16', 'int8', 'float8_e4m3fn' or 'int4'."""
        return kv_kind(self.k[0].dtype)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def layer(self, i: int) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """(k, v, k_scale, v_scale) of layer i."""
        if self.quantized:
            return self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]
        return self.k[i], self.v[i], None, None

    def only_layer(self, i: int) -> KVPools:
        """Layer i's pools as a one-layer KVPools (what one shard of the attention takes and returns)."""
        one = lambda t: None if t is None else (t[i],)
        return KVPools(one(self.k), one(self.v), one(self.k_scale), one(self.v_scale))

    def with_layer(self, i: int, k, v, k_scale=None, v_scale=None) -> KVPools:
        put = lambda t, x: t[:i] + (x,) + t[i + 1 :]
        if self.quantized:
            return KVPools(put(self.k, k), put(self.v, v), put(self.k_scale, k_scale), put(self.v_scale, v_scale))
        return KVPools(put(self.k, k), put(self.v, v))


def allocate_pools(config: ModelConfig, num_blocks: int, block_size: int, kv_dtype: str = "bfloat16",
                   sharding: jax.sharding.Sharding | None = None) -> KVPools:  # fmt: skip
    """Allocate the pools once, zero-filled, on the default device, or laid out as `sharding` says (a tensor-
    parallel mesh splits every pool by KV heads: jkv.sharding.POOL)."""
    if kv_dtype not in FLOAT_KV and kv_dtype not in QUANT_KV and kv_dtype != INT4:
        raise ValueError(f"kv_dtype={kv_dtype!r} is not supported by the engine: use one of "
                         f"{', '.join([*FLOAT_KV, *QUANT_KV, INT4])}.")  # fmt: skip
    if num_blocks < 2:
        raise ValueError(f"num_blocks={num_blocks} must be at least 2 (block 0 is the null block).")
    shape = (num_blocks, config.kv_heads, block_size, config.head_dim)
    layers = range(config.n_layer)
    zeros = lambda shp, d: tuple(jnp.zeros(shp, d, device=sharding) for _ in layers)
    if kv_dtype in FLOAT_KV:
        dt = FLOAT_KV[kv_dtype]
        return KVPools(zeros(shape, dt), zeros(shape, dt))
    if kv_dtype == INT4:
        if config.head_dim % 2:
            raise ValueError(f"kv_dtype='int4' needs an even head_dim (two values per byte), not {config.head_dim}.")
        data = (*shape[:-1], config.head_dim // 2)
        scales = (*shape[:-1], int4_groups(config.head_dim))
        return KVPools(zeros(data, INT4_PAGE_DTYPE), zeros(data, INT4_PAGE_DTYPE), zeros(scales, SCALE_DTYPE),
                       zeros(scales, SCALE_DTYPE))  # fmt: skip
    dt = QUANT_KV[kv_dtype][0]
    return KVPools(zeros(shape, dt), zeros(shape, dt), zeros(shape[:-1], SCALE_DTYPE), zeros(shape[:-1], SCALE_DTYPE))


def kv_kind(storage_dtype) -> str:
    """The kv dtype name of a pool's storage dtype (uint8 storage is packed int4)."""
    dt = jnp.dtype(storage_dtype)
    return INT4 if dt == jnp.dtype(INT4_PAGE_DTYPE) else dt.name


def layout_bytes(config: ModelConfig, num_blocks: int, block_size: int, kv_dtype: str) -> int:
    """Bytes the planner counts for these pools (tests check the real pools agree byte for byte)."""
    from kvspec.layout import kv_dtype as planner_kv_dtype

    return BlockLayout(config, planner_kv_dtype(kv_dtype), block_size, num_blocks).pool_bytes


def quantize(x: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-row quantization over the last axis: x ~= data * scale, scale = absmax / qmax.

    int4: per group of 32 elements, qmax 7, data packed two per byte (uint8 [..., D // 2], scales [..., D // 32]).
    """
    if kind == INT4:
        return quantize_int4(x)
    dt, qmax = QUANT_KV[kind]
    xf = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(xf), axis=-1) / qmax).astype(SCALE_DTYPE)
    s = jnp.where(scale > 0, scale.astype(jnp.float32), 1.0)[..., None]
    q = xf / s
    data = jnp.clip(jnp.round(q), -qmax, qmax).astype(dt) if kind == "int8" else jnp.clip(q, -qmax, qmax).astype(dt)
    return data, scale


def dequantize(data: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 values of quantized data (int8 / fp8 with a scale per row, or packed int4 with group scales)."""
    if jnp.dtype(data.dtype) == jnp.dtype(INT4_PAGE_DTYPE):
        return dequantize_int4(data, scale)
    return data.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]


def write_tokens(
    pools: KVPools,
    layer: int,
    k: jax.Array,  # [N, Hkv, D] new keys, one row per token
    v: jax.Array,  # [N, Hkv, D]
    blocks: jax.Array,  # [N] int32 physical block of each token (0 for padding tokens)
    offsets: jax.Array,  # [N] int32 slot within the block
) -> KVPools:
    """Scatter new tokens' K/V (quantizing on write) into layer `layer` of the pools; traceable."""
    kp, vp, ksp, vsp = pools.layer(layer)
    if pools.quantized:
        kind = kv_kind(kp.dtype)
        kq, ks = quantize(k, kind)
        vq, vs = quantize(v, kind)
        return pools.with_layer(
            layer,
            kp.at[blocks, :, offsets].set(kq),
            vp.at[blocks, :, offsets].set(vq),
            ksp.at[blocks, :, offsets].set(ks),
            vsp.at[blocks, :, offsets].set(vs),
        )
    return pools.with_layer(
        layer, kp.at[blocks, :, offsets].set(k.astype(kp.dtype)), vp.at[blocks, :, offsets].set(v.astype(vp.dtype))
    )


def _map_pools(fn, pools: KVPools) -> KVPools:
    return jax.tree.map(fn, pools)


def _copy_blocks(pools: KVPools, src: jax.Array, dst: jax.Array) -> KVPools:
    """pool[dst] = pool[src] in every layer (copy-on-write); in place thanks to donation."""
    return _map_pools(lambda a: a.at[dst].set(a[src]), pools)


def _gather_blocks(pools: KVPools, blocks: jax.Array) -> KVPools:
    """The contents of `blocks` (all layers), to be moved to host memory when a sequence is swapped out."""
    return _map_pools(lambda a: a[blocks], pools)


def _scatter_blocks(pools: KVPools, blocks: jax.Array, contents: KVPools) -> KVPools:
    """pool[blocks] = contents in every layer (swap-in)."""
    return jax.tree.map(lambda a, c: a.at[blocks].set(c), pools, contents)


# Jitted (the pools donated where they are rewritten), executables kept in the compile cache like the steps'. An
# executable runs on the devices it was compiled for: pools on other devices (a tensor-parallel mesh) get their own.
copy_blocks = StoredFunction("kv_cache.copy_blocks", _copy_blocks, donate_argnums=0)
gather_blocks = StoredFunction("kv_cache.gather_blocks", _gather_blocks)
scatter_blocks = StoredFunction("kv_cache.scatter_blocks", _scatter_blocks, donate_argnums=0)
_MESH_BLOCK_FNS: dict[tuple[int, ...], tuple[StoredFunction, StoredFunction, StoredFunction]] = {}


def block_functions(pools: KVPools) -> tuple[StoredFunction, StoredFunction, StoredFunction]:
    """(copy_blocks, gather_blocks, scatter_blocks) for pools laid out as `pools` are."""
    sharding = pools.k[0].sharding
    devices = list(sharding.mesh.devices.flat) if isinstance(sharding, NamedSharding) else list(sharding.device_set)
    if devices == [jax.devices()[0]]:
        return copy_blocks, gather_blocks, scatter_blocks
    ids = tuple(d.id for d in devices)
    if ids not in _MESH_BLOCK_FNS:
        _MESH_BLOCK_FNS[ids] = tuple(
            StoredFunction(f"kv_cache.{fn.__name__[1:]}@{list(ids)}", fn, donate_argnums=donate, devices=devices)
            for fn, donate in ((_copy_blocks, 0), (_gather_blocks, ()), (_scatter_blocks, 0))
        )
    return _MESH_BLOCK_FNS[ids]


def to_host(tree: KVPools) -> KVPools:
    return jax.tree.map(np.asarray, jax.device_get(tree))


SWAP_STAGING_BYTES = 64 * 2**20  # most KV bytes one swap call gathers or scatters on the device


class KVCache:
    """The engine's KV storage: the device pools, host swap space laid out like them, and the block copies.

    Every copy call is padded to a power of two of blocks with null-block entries, so each bucket compiles once
    (`warm` compiles them all). Swapping moves blocks in calls of at most `swap_chunk` blocks: at most one longest
    sequence's blocks and SWAP_STAGING_BYTES of device staging, whatever a request holds.
    """

    def __init__(self, config: ModelConfig, *, num_blocks: int, block_size: int, kv_dtype: str, swap_blocks: int = 0,
                 max_seq_len: int, sharding: jax.sharding.Sharding | None = None) -> None:  # fmt: skip
        self.pools: KVPools = allocate_pools(config, num_blocks, block_size, kv_dtype, sharding)
        self.channel = None  # process 0 of several (jkv.sharding.StepChannel): block copies are broadcast first
        self.host_pools: KVPools | None = None
        if swap_blocks:
            self.host_pools = jax.tree.map(lambda a: np.zeros((swap_blocks, *a.shape[1:]), a.dtype), self.pools)
        # one device's bytes of a block (split by KV heads under tensor parallelism, as the planner counts them)
        self.bytes_per_block = sum(a.addressable_shards[0].data.nbytes // a.shape[0]
                                   for a in jax.tree.leaves(self.pools))  # fmt: skip
        self.swap_chunk = min(bucket(cdiv(max_seq_len, block_size)),
                              1 << max(0, (SWAP_STAGING_BYTES // self.bytes_per_block).bit_length() - 1))  # fmt: skip

    @property
    def num_blocks(self) -> int:
        return self.pools.num_blocks

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst = block src for each (src, dst), padded with null-block-to-itself copies."""
        pad = [0] * (bucket(len(pairs)) - len(pairs))
        src = np.asarray([s for s, _ in pairs] + pad, np.int32)
        dst = np.asarray([d for _, d in pairs] + pad, np.int32)
        if self.channel is not None:
            self.channel.send("copy", (), (src, dst))
        self.copy_arrays(src, dst)

    def copy_arrays(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Block dst[i] = block src[i] (padded index arrays, as `copy` builds them)."""
        self.pools = block_functions(self.pools)[0](self.pools, src, dst)

    def _pieces(self, n: int):
        """(start, stop, padded size) of each swap call moving n blocks."""
        for start in range(0, n, self.swap_chunk):
            stop = min(n, start + self.swap_chunk)
            yield start, stop, bucket(stop - start)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to host slots, for each (device block, host slot) in order."""
        dev, host = [d for d, _ in pairs], [h for _, h in pairs]
        leaves = jax.tree.leaves(self.host_pools)
        for start, stop, size in self._pieces(len(dev)):
            ids = dev[start:stop] + [0] * (size - (stop - start))
            data = jax.device_get(block_functions(self.pools)[1](self.pools, np.asarray(ids, np.int32)))
            for h_arr, d_arr in zip(leaves, jax.tree.leaves(data)):
                h_arr[host[start:stop]] = d_arr[: stop - start]

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy host slots back to device blocks, for each (host slot, device block); padding writes block 0."""
        host, dev = [h for h, _ in pairs], [d for _, d in pairs]
        for start, stop, size in self._pieces(len(dev)):
            pad = size - (stop - start)
            idx = np.asarray(host[start:stop] + [host[start]] * pad)
            contents = jax.tree.map(lambda a, idx=idx: jnp.asarray(a[idx]), self.host_pools)
            ids = np.asarray(dev[start:stop] + [0] * pad, np.int32)
            self.pools = block_functions(self.pools)[2](self.pools, ids, contents)

    def warm(self, copy_sizes: list[int]) -> None:
        """Compile every copy call size (the null block onto itself) and, with swap space, every swap call size
        (the null block to host slot 0 and back): nothing is moved that any sequence holds."""
        for n in copy_sizes:
            self.copy([(0, 0)] * n)
        if self.host_pools is not None:
            for n in sorted({bucket(n) for n in range(1, self.swap_chunk + 1)}):
                self.swap_out([(0, 0)] * n)
                self.swap_in([(0, 0)] * n)
        jax.block_until_ready(self.pools)

    def close(self) -> None:
        """Free the device pools now (the cache is unusable afterwards)."""
        for a in jax.tree.leaves(self.pools):
            if not a.is_deleted():
                a.delete()
        self.host_pools = None
