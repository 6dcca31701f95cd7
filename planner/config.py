"""Moved to kvspec.config; kept for callers not yet updated (the engine files and scripts/ still import it).

New code imports `kvspec.config` (or `kvspec`); the planner's own error is `planner.PlanError`, the same class as
`kvspec.ConfigError`.
"""

from kvspec.config import PRESETS, ConfigError, ModelConfig, config_from_hf, load_config
from planner.plan import PlanError

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "PlanError", "config_from_hf", "load_config"]
