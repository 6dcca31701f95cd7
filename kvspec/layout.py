"""Bytes of the KV cache: element types, quantization scales, and the block layout of the K/V pools.

The pool layout every part of jkv agrees on (planner, engine, kernels), shown stacked over layers; the engine keeps
one array per layer (`layer_pool_shape`), so a kernel reads a whole layer's pool without a slice copy:

    k_pool, v_pool: [n_layer, num_blocks, kv_heads, block_size, head_dim]    (int4: head_dim // 2 bytes, packed)
    k_scale, v_scale: [n_layer, num_blocks, kv_heads, block_size, n_groups]  (quantized kinds only, float16)

One head's rows of one block are contiguous (`block_size * head_dim * itemsize` bytes), so a kernel reads a block
of one head as a single dense tile; with head_dim 64 in bfloat16 one token's row is exactly one 128-byte line.
Block 0 of every pool is the null block: padding entries of block tables point to it, and it is never handed out.

Pure Python: no JAX, no device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvspec.config import ConfigError, ModelConfig

# Bytes per element of the weight/compute dtypes.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

# Scales of quantized KV kinds are float16: 10 mantissa bits keep the scale's own rounding far below the
# quantization step, and 2 bytes (not 4) keep an int8 pool at (64 + 2) / 128 = 0.516x a bfloat16 pool at head_dim 64.
SCALE_BYTES = 2
INT4_GROUP = 32  # int4 pages: one scale per 32 consecutive elements of a head's row


@dataclass(frozen=True, slots=True)
class KVDtype:
    """How one K or V row of one head (head_dim elements) is stored."""

    name: str
    bits: int  # bits per element
    scale_group: int | None  # elements per scale; None: no scales (float kinds)

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of data (no scales) for one token of one head."""
        return head_dim * self.bits // 8

    def scale_groups(self, head_dim: int) -> int:
        if self.scale_group is None:
            return 0
        return math.ceil(head_dim / min(self.scale_group, head_dim))

    def scale_row_bytes(self, head_dim: int) -> int:
        return self.scale_groups(head_dim) * SCALE_BYTES

    @property
    def quantized(self) -> bool:
        return self.scale_group is not None


# int8 and float8_e4m3fn carry one scale per token per head (scale_group = the whole row: written as a large number
# and clamped to head_dim); int4 packs two elements per byte with a scale per INT4_GROUP elements.
KV_DTYPES: dict[str, KVDtype] = {
    "float32": KVDtype("float32", 32, None),
    "bfloat16": KVDtype("bfloat16", 16, None),
    "float16": KVDtype("float16", 16, None),
    "int8": KVDtype("int8", 8, 1 << 30),
    "float8_e4m3fn": KVDtype("float8_e4m3fn", 8, 1 << 30),
    "int4": KVDtype("int4", 4, INT4_GROUP),
}


def kv_dtype(name: str) -> KVDtype:
    if name not in KV_DTYPES:
        raise ConfigError(f"unknown KV dtype {name!r}: use one of {', '.join(KV_DTYPES)}.")
    return KV_DTYPES[name]


def weight_dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_BYTES)}.")
    return DTYPE_BYTES[name]


def kv_heads_per_device(config: ModelConfig, tp: int) -> int:
    """KV heads one device holds under `tp`-way tensor parallelism (replicated when there are fewer than tp)."""
    if tp < 1:
        raise ConfigError(f"--tp {tp} must be a positive integer.")
    if config.n_head % tp:
        raise ConfigError(f"--tp {tp} must divide the model's {config.n_head} attention heads.")
    kvh = config.kv_heads
    if kvh % tp and tp % kvh:
        raise ConfigError(f"--tp {tp} must divide, or be a multiple of, the model's {kvh} KV heads.")
    return max(1, kvh // tp)


def kv_bytes_per_token(config: ModelConfig, kv: KVDtype, tp: int = 1) -> int:
    """K and V bytes (with scales) one token costs on one device, all layers: 2 * layers * kv_heads * row bytes."""
    per_head = kv.row_bytes(config.head_dim) + kv.scale_row_bytes(config.head_dim)
    return 2 * config.n_layer * kv_heads_per_device(config, tp) * per_head


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Shape and bytes of one device's K/V block pools."""

    config: ModelConfig
    kv: KVDtype
    block_size: int
    num_blocks: int  # including the null block 0
    tp: int = 1

    def __post_init__(self) -> None:
        check_block_size(self.block_size)

    @property
    def kv_heads(self) -> int:
        return kv_heads_per_device(self.config, self.tp)

    @property
    def pool_shape(self) -> tuple[int, ...]:
        """Shape of k_pool (and of v_pool): [n_layer, num_blocks, kv_heads, block_size, head_dim(/2 for int4)]."""
        last = self.config.head_dim * self.kv.bits // 8 if self.kv.bits < 8 else self.config.head_dim
        return (self.config.n_layer, self.num_blocks, self.kv_heads, self.block_size, last)

    @property
    def layer_pool_shape(self) -> tuple[int, ...]:
        return self.pool_shape[1:]

    @property
    def scale_shape(self) -> tuple[int, ...] | None:
        if not self.kv.quantized:
            return None
        groups = self.kv.scale_groups(self.config.head_dim)
        return (self.config.n_layer, self.num_blocks, self.kv_heads, self.block_size, groups)

    @property
    def head_block_bytes(self) -> int:
        """Contiguous data bytes of one head's rows in one block (one K or V tile a kernel reads)."""
        return self.block_size * self.kv.row_bytes(self.config.head_dim)

    @property
    def token_row_bytes(self) -> int:
        return self.kv.row_bytes(self.config.head_dim)

    @property
    def rows_line_aligned(self) -> bool:
        """Whether one head's block tile is a whole number of 128-byte lines."""
        return self.head_block_bytes % 128 == 0

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.kv, self.tp)

    @property
    def bytes_per_block(self) -> int:
        """K + V (+ scales) bytes of one block across all layers."""
        return self.block_size * self.bytes_per_token

    @property
    def pool_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def usable_blocks(self) -> int:
        return max(0, self.num_blocks - 1)  # block 0 is the null block


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
        raise ConfigError(f"block size {block_size} must be a power of two (1, 2, 4, ... 16 is the default).")


def blocks_for_tokens(tokens: int, block_size: int, sliding_window: int | None = None) -> int:
    """Blocks one sequence of `tokens` tokens holds at once.

    With a sliding window W only the blocks that still hold one of the last W positions are kept: at most
    ceil(W / block_size) + 1 (the window straddles a block boundary in general).
    """
    if tokens <= 0:
        return 0
    full = math.ceil(tokens / block_size)
    if sliding_window is None:
        return full
    return min(full, math.ceil(sliding_window / block_size) + 1)
