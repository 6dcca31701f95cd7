"""Moved to kvspec.layout; kept for callers not yet updated (the engine files and scripts/ still import it).

New code imports `kvspec.layout` (or `kvspec`).
"""

from kvspec.layout import (
    DTYPE_BYTES, INT4_GROUP, KV_DTYPES, SCALE_BYTES, BlockLayout, KVDtype, blocks_for_tokens, check_block_size,
    kv_bytes_per_token, kv_dtype, kv_heads_per_device, weight_dtype_bytes,
)  # fmt: skip

__all__ = [
    "DTYPE_BYTES", "INT4_GROUP", "KV_DTYPES", "SCALE_BYTES", "BlockLayout", "KVDtype", "blocks_for_tokens",
    "check_block_size", "kv_bytes_per_token", "kv_dtype", "kv_heads_per_device", "weight_dtype_bytes",
]  # fmt: skip
