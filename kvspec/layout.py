"""Bytes of the KV cache: element types, quantization scales, and the block layout of the K/V pools.

The pool layout every part of jkv agrees on (planner, engine, kernels), shown stacked over layers; the engine keeps
one array per layer (`layer_pool_shape`), so a kernel reads a whole layer's pool without a slice copy:

    k_pool, v_pool: [n_layer, num_blocks, kv_heads, block_size, head_dim]    (int4: head_dim // 2 bytes, packed)
    k_scale, v_scale: [n_layer, num_blocks, kv_heads, block_size, n_groups]  (quantized kinds only, float16)

One head's rows of one block are contiguous (`block_size * head_dim * itemsize` bytes), so a kernel reads a block
of one head as a single dense tile; with head_dim 64 in bfloat16 one token's row is exactly one 128-byte line.
Block 0 of every pool is the null block: padding entries of block tables point to it, and it is never handed out.

Under MLA (DeepSeek) a layer caches one latent row of kv_lora_rank + qk_rope_head_dim elements per token in one
pool of one "head" (`cache_tensors` = 1), as vLLM and SGLang store it. Models whose sliding layers alternate with
full ones (Gemma) cache the same row shape on every layer; a sliding layer holds at most its window's blocks
(`sequence_layer_blocks`).

Pure Python: no JAX, no device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvspec.config import ConfigError, ModelConfig
from kvspec.params import kv_heads_per_device

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


def cache_row_bytes(config: ModelConfig, kv: KVDtype) -> int:
    """Bytes (with scales) of one cached head row of one token in one layer: a K or V row, or the MLA latent."""
    d = config.cache_head_dim
    return kv.row_bytes(d) + kv.scale_row_bytes(d)


def kv_bytes_per_token(config: ModelConfig, kv: KVDtype, tp: int = 1) -> int:
    """Cache bytes one token costs on one device, over all layers, for a sequence inside every window:
    cache tensors (K and V: 2; MLA's latent: 1) x layers x cached heads per device x row bytes."""
    heads = kv_heads_per_device(config, tp)
    return config.cache_tensors * config.n_layer * heads * cache_row_bytes(config, kv)


def layer_bytes_per_token(config: ModelConfig, kv: KVDtype, tp: int = 1) -> int:
    """kv_bytes_per_token of one layer (every layer caches the same row shape; only windows differ)."""
    return kv_bytes_per_token(config, kv, tp) // config.n_layer


def sequence_layer_blocks(config: ModelConfig, tokens: int, block_size: int) -> int:
    """Blocks of one layer's cache, summed over layers, that one sequence of `tokens` tokens holds at once.

    A windowed layer keeps only the blocks that still hold one of its last W positions (`blocks_for_tokens`), as
    an allocator that frees a sliding layer's blocks behind its window does. With every layer alike this is
    n_layer x blocks_for_tokens(tokens).
    """
    total = 0
    for window, layers in window_groups(config).items():
        total += layers * blocks_for_tokens(tokens, block_size, window)
    return total


def window_groups(config: ModelConfig) -> dict[int | None, int]:
    """{window (None: full attention): number of layers}, in layer order of first appearance."""
    groups: dict[int | None, int] = {}
    for window in config.layer_windows:
        groups[window] = groups.get(window, 0) + 1
    return groups


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
        d = self.config.cache_head_dim
        last = d * self.kv.bits // 8 if self.kv.bits < 8 else d
        return (self.config.n_layer, self.num_blocks, self.kv_heads, self.block_size, last)

    @property
    def layer_pool_shape(self) -> tuple[int, ...]:
        return self.pool_shape[1:]

    @property
    def scale_shape(self) -> tuple[int, ...] | None:
        if not self.kv.quantized:
            return None
        groups = self.kv.scale_groups(self.config.cache_head_dim)
        return (self.config.n_layer, self.num_blocks, self.kv_heads, self.block_size, groups)

    @property
    def head_block_bytes(self) -> int:
        """Contiguous data bytes of one head's rows in one block (one K or V tile a kernel reads)."""
        return self.block_size * self.kv.row_bytes(self.config.cache_head_dim)

    @property
    def token_row_bytes(self) -> int:
        return self.kv.row_bytes(self.config.cache_head_dim)

    @property
    def pools_per_layer(self) -> int:
        """k_pool and v_pool (2), or one latent pool under MLA (1)."""
        return self.config.cache_tensors

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
