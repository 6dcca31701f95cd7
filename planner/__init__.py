"""jkv's static memory planner: KV block layout, block count and batch/context limits, before anything runs.

Pure Python (no JAX, no device). Entry points: `load_config`, `make_plan`, `plan_to_dict`; the command line is
`scripts/plan.py`. The model shapes and KV layout it plans from live in `kvspec` (re-exported here); `PlanError`
is the same class as `kvspec.ConfigError`.
"""

from kvspec.config import PRESETS, ModelConfig, config_from_hf, load_config
from kvspec.layout import KV_DTYPES, BlockLayout, KVDtype, blocks_for_tokens, kv_bytes_per_token, kv_dtype
from planner.memory import param_bytes, runtime_reserve, step_workspace
from planner.plan import Plan, PlanError, PlanOptions, expected_fragmentation, make_plan
from planner.report import plan_to_dict
from planner.units import human_bytes, parse_size

__all__ = [
    "PRESETS", "ModelConfig", "PlanError", "config_from_hf", "load_config",
    "KV_DTYPES", "BlockLayout", "KVDtype", "blocks_for_tokens", "kv_bytes_per_token", "kv_dtype",
    "param_bytes", "runtime_reserve", "step_workspace",
    "Plan", "PlanOptions", "expected_fragmentation", "make_plan", "plan_to_dict",
    "human_bytes", "parse_size",
]  # fmt: skip
