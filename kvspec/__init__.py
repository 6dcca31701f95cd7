"""jkv's neutral spec: the model's shape and the KV cache's byte layout, shared by the planner, model and kernels.

Pure Python, no JAX: importing `kvspec` pulls in no device library, so the planner stays a pure calculator and the
model and kernels depend on the one description of a config and a pool layout instead of on the planner.

- `kvspec.config`: `ModelConfig` (with `MoEConfig`, `MLAConfig`, `VisionConfig`), the presets, `load_config`,
  `ConfigError`.
- `kvspec.hf_config`: `config_from_hf`, reading every supported family's `config.json`.
- `kvspec.params`: each family's parameter tensors per tensor-parallel device, and the `--tp` checks.
- `kvspec.layout`: KV element kinds (`KVDtype`, `KV_DTYPES`, `INT4_GROUP`, scale bytes), bytes per token, and the
  block pools' shape (`BlockLayout`, `blocks_for_tokens`).
- `kvspec.shapes`: the engine steps' shape and bucketing policy (imported from there; not re-exported here).
"""

from kvspec.config import PRESETS, ConfigError, ModelConfig, config_from_hf, load_config, preset_names
from kvspec.layout import (
    DTYPE_BYTES, INT4_GROUP, KV_DTYPES, SCALE_BYTES, BlockLayout, KVDtype, blocks_for_tokens, check_block_size,
    kv_bytes_per_token, kv_dtype, weight_dtype_bytes,
)  # fmt: skip
from kvspec.params import check_tp, kv_heads_per_device

__all__ = [
    "PRESETS", "ConfigError", "ModelConfig", "config_from_hf", "load_config", "preset_names",
    "DTYPE_BYTES", "INT4_GROUP", "KV_DTYPES", "SCALE_BYTES", "BlockLayout", "KVDtype", "blocks_for_tokens",
    "check_block_size", "kv_bytes_per_token", "kv_dtype", "kv_heads_per_device", "weight_dtype_bytes",
    "check_tp",
]  # fmt: skip
