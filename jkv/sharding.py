"""Tensor parallelism on a `("tp",)` jax Mesh: where every parameter and K/V pool lives, and how a step runs.

The rules are Megatron's, as `kvspec.params` counts them per device (the planner's `--tp N` figures):
- column-parallel: the query, key and value projections by heads, MLP gate/up (GPT-2's c_fc) by columns;
- row-parallel: the attention output and MLP down projections by input rows; their output is a partial sum that
  XLA completes with one all-reduce each; their biases stay whole;
- vocab-parallel: the token embedding and the lm-head, ceil(V / N) rows per device (zero rows pad the last part;
  the model drops their logits);
- replicated: position embeddings, norms, and K/V heads when the model has fewer than N: each device then holds
  one (repeated) KV head, so the model is run as one of N KV heads whose copies share weights.

GPT-2's fused c_attn [E, (H + 2 Hkv) D] is permuted at load so that a contiguous split gives each device its own
heads: shard s's columns are [its q heads | its k heads | its v heads]. `jkv.model.forward(..., tp=N)` reads the
projection's output in that order; at N = 1 the permutation is the identity.

A step is one GSPMD program (`jax.jit` over arguments placed with NamedSharding): XLA partitions the GEMMs from
the weights' shardings. The paged attention, which XLA cannot partition (Pallas kernels, scatters into the pools),
runs per shard under `jax.shard_map`: each device writes and reads its own KV heads of the pools with its own
query heads; the block tables and lengths are replicated, so one host block table drives every shard. tp = 1 is
the same program on a one-device mesh.

Several hosts: every process calls `jax.distributed.initialize` and builds the same engine (the mesh spans every
device of every process). Process 0 runs the scheduler; each device call it makes is broadcast first
(`StepChannel`), and the other processes replay it in `Engine.follow()` on their own shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvspec.config import ConfigError, ModelConfig
from kvspec.params import check_tp, vocab_rows

AXIS = "tp"
HEADS = P(None, None, AXIS)  # q, k, v [B, T, heads, D] split by heads
POOL = P(None, AXIS)  # K/V pools [blocks, kv heads, ...] (and their scales) split by KV heads

# The parameters' PartitionSpecs by module and leaf name (GPT-2 keeps Flax's [in, out] kernels, the Llama family
# torch's [out, in] weights); anything not named here is replicated.
_GPT2_SPECS = {
    ("c_attn", "kernel"): P(None, AXIS), ("c_attn", "bias"): P(AXIS),
    ("attn", "c_proj", "kernel"): P(AXIS, None),
    ("c_fc", "kernel"): P(None, AXIS), ("c_fc", "bias"): P(AXIS),
    ("mlp", "c_proj", "kernel"): P(AXIS, None),
    ("wte", "embedding"): P(AXIS, None), ("lm_head",): P(AXIS, None),
}  # fmt: skip
_LLAMA_SPECS = {
    **{(m, "weight"): P(AXIS, None) for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")},
    **{(m, "bias"): P(AXIS) for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")},
    ("o_proj", "weight"): P(None, AXIS), ("down_proj", "weight"): P(None, AXIS),
    ("embed_tokens", "weight"): P(AXIS, None), ("lm_head", "weight"): P(AXIS, None),
}  # fmt: skip


def check_tensor_parallel(config: ModelConfig, size: Any) -> int:
    """`size` as an int after checking it against the model and the devices; one sentence per problem."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"tensor_parallel_size={size!r} must be a positive integer.")
    size = int(size)
    try:
        check_tp(config, size)
    except ConfigError as err:  # the planner's rule, in the engine's words
        raise ValueError(str(err).replace(f"--tp {size}", f"tensor_parallel_size={size}", 1)) from None
    devices = jax.device_count()
    if size > devices:
        raise ValueError(f"tensor_parallel_size={size} needs {size} devices but JAX sees {devices} "
                         f"({jax.default_backend()}): lower it, or run on a machine with more devices.")  # fmt: skip
    if jax.process_count() > 1 and size != devices:
        raise ValueError(f"tensor_parallel_size={size} must be all {devices} devices of the {jax.process_count()} "
                         "processes under jax.distributed: the mesh spans every device.")  # fmt: skip
    return size


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """A `("tp",)` mesh over the first `size` devices and the engine's sharding rules over it."""

    mesh: Mesh

    @classmethod
    def create(cls, config: ModelConfig, size: int = 1) -> TensorParallel:
        size = check_tensor_parallel(config, size)
        return cls(Mesh(np.asarray(jax.devices()[:size]), (AXIS,)))

    def __repr__(self) -> str:  # part of the compile cache's keys: the devices, not just the size
        return f"TensorParallel({self.size}, devices={[d.id for d in self.mesh.devices.flat]})"

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def multi_process(self) -> bool:
        return jax.process_count() > 1

    def sharding(self, spec: P = P()) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(P())

    @property
    def pools(self) -> NamedSharding:
        return self.sharding(POOL)

    # Shapes under the mesh ------------------------------------------------------------------------------------
    def kv_copies(self, config: ModelConfig) -> int:
        """How many devices hold each KV head: 1 when the KV heads split, N / kv_heads when replicated."""
        return max(1, self.size // config.kv_heads)

    def model_config(self, config: ModelConfig) -> ModelConfig:
        """The config the sharded model runs as: with fewer KV heads than devices, N KV heads (each a repeat)."""
        copies = self.kv_copies(config)
        return config if copies == 1 else config.replace(n_kv_head=config.kv_heads * copies)

    # Placement ------------------------------------------------------------------------------------------------
    def put(self, value, sharding: NamedSharding) -> jax.Array:
        """A global array of `value` placed with `sharding`. Every process passes the same value."""
        if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
            return value  # already laid out so (tp = 1 on the model's device): no second copy of the weights
        if not self.multi_process:
            return jax.device_put(value, sharding)
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def place_params(self, params: dict, config: ModelConfig) -> dict:
        """The parameter tree laid out and placed for this mesh (see the module docstring); at tp = 1 the same
        arrays on the mesh's device."""
        specs = _GPT2_SPECS if config.model_type == "gpt2" else _LLAMA_SPECS
        flat, tree = jax.tree_util.tree_flatten_with_path(params)
        out = []
        for path, leaf in flat:
            names = tuple(str(getattr(p, "key", p)) for p in path)
            spec = next((s for k, s in specs.items() if names[-len(k) :] == k), P())
            if self.size > 1:
                leaf = self._relayout(names, np.asarray(leaf), config)
            out.append(self.put(leaf, self.sharding(spec)))
        return jax.tree.unflatten(tree, out)

    def _relayout(self, names: tuple[str, ...], a: np.ndarray, config: ModelConfig) -> np.ndarray:
        """One host tensor in the sharded layout: vocab padded, KV heads repeated, GPT-2's c_attn permuted."""
        n, d, copies = self.size, config.head_dim, self.kv_copies(config)
        if names[-2:] in (("wte", "embedding"), ("embed_tokens", "weight"), ("lm_head", "weight")) or names == (
            "lm_head",
        ):
            rows = vocab_rows(config, n) * n
            return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)]) if rows > len(a) else a
        if names[-2] in ("k_proj", "v_proj") and copies > 1:  # [Hkv * D, (E)] -> each head's rows `copies` times
            return np.repeat(a.reshape(config.kv_heads, d, *a.shape[1:]), copies, axis=0).reshape(-1, *a.shape[1:])
        if names[-2] == "c_attn":  # [(E,) (H + 2 Hkv) D]: q | k | v  ->  per shard [q_s | k_s | v_s]
            h, hkv = config.n_head, config.kv_heads
            q, k, v = np.split(a, [h * d, (h + hkv) * d], axis=-1)
            lead = a.shape[:-1]
            k, v = (np.repeat(x.reshape(*lead, hkv, d), copies, axis=-2).reshape(*lead, -1) for x in (k, v))
            parts = [x.reshape(*lead, n, x.shape[-1] // n) for x in (q, k, v)]  # [..., N, heads_s * D]
            return np.concatenate(parts, axis=-1).reshape(*lead, -1)
        return a

    # Running --------------------------------------------------------------------------------------------------
    def per_shard(self, fn: Callable, in_specs, out_specs) -> Callable:
        """`fn` run on every device over its own block of the arguments (`jax.shard_map` over the mesh)."""
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def constrain(self, tree, sharding: NamedSharding):
        """Inside a step: `tree`'s arrays laid out as `sharding` says (None leaves stay None)."""
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)

    def local(self, x: jax.Array) -> jax.Array:
        """A replicated result as an array of this process's first device: the host reads it without a collective,
        and computations on it (log-probabilities, a beam's logits) stay on this process."""
        if not self.multi_process or x is None:
            return x
        return x.addressable_data(0)

    def inputs(self, *arrays):
        """Host step inputs as the step takes them: as they are on one process, replicated global arrays on several
        (every process passes the same values, as the step channel ensures)."""
        if not self.multi_process:
            return arrays
        return tuple(None if a is None else self.put(a, self.replicated) for a in arrays)


def shard_bytes(tree, device: jax.Device | None = None) -> int:
    """Bytes of `tree`'s arrays held on `device` (default: the first device any of them lives on)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shards = a.addressable_shards
        dev = device or shards[0].device
        total += sum(s.data.nbytes for s in shards if s.device == dev)
    return total


def broadcast(tree):
    """`tree` (NumPy arrays of shapes every process knows) as process 0 holds it, on every process."""
    return multihost_utils.broadcast_one_to_all(tree)


class StepChannel:
    """Process 0's device calls, announced to every other process so that each makes the same call on its shards.

    A message is an operation, up to MAX_STATICS small ints (flags and shapes) and up to MAX_ARRAYS flat int32 or
    float32 arrays (the packed step inputs). It travels as two broadcasts: a fixed-size int32 header, then one
    int32 payload padded to a power of two (floats bit-cast), so the broadcasts compile for a bounded set of sizes.
    """

    OPS = ("close", "step", "scoring", "steps", "copy")
    MAX_STATICS, MAX_ARRAYS = 8, 4
    _HEADER = 2 + MAX_STATICS + 1 + 2 * MAX_ARRAYS
    _KINDS = (np.dtype(np.int32), np.dtype(np.float32))

    def send(self, op: str, statics: tuple = (), arrays: tuple = ()) -> None:
        header = np.zeros(self._HEADER, np.int32)
        header[0], header[1] = self.OPS.index(op), len(statics)
        header[2 : 2 + len(statics)] = [int(v) for v in statics]
        at = 2 + self.MAX_STATICS
        header[at] = len(arrays)
        flat = [np.ascontiguousarray(a).ravel() for a in arrays]
        for i, a in enumerate(flat):
            header[at + 1 + 2 * i : at + 3 + 2 * i] = self._KINDS.index(a.dtype), a.size
        broadcast(header)
        payload = np.zeros(_padded(sum(a.size for a in flat)), np.int32)
        if flat:
            data = np.concatenate([a.view(np.int32) for a in flat])
            payload[: data.size] = data
        broadcast(payload)

    def receive(self) -> tuple[str, tuple[int, ...], list[np.ndarray]]:
        header = broadcast(np.zeros(self._HEADER, np.int32))
        op, n = self.OPS[int(header[0])], int(header[1])
        statics = tuple(int(v) for v in header[2 : 2 + n])
        at = 2 + self.MAX_STATICS
        specs = [(self._KINDS[int(header[at + 1 + 2 * i])], int(header[at + 2 + 2 * i])) for i in range(header[at])]
        payload = broadcast(np.zeros(_padded(sum(size for _, size in specs)), np.int32))
        arrays, start = [], 0
        for dtype, size in specs:
            arrays.append(payload[start : start + size].view(dtype).copy())
            start += size
        return op, statics, arrays


def _padded(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())
