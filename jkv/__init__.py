"""jkv: paged KV-cache engine on JAX (model, block manager, scheduler, model executor, engine facade).

The public names load on first use, so host-only submodules (`jkv.block_pool`, `jkv.block_manager`,
`jkv.bench.hf_torch`) import without JAX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AttentionFn": "jkv.model",
    "Model": "jkv.model",
    "attend_no_cache": "jkv.model",
    "forward": "jkv.model",
    "DenseCache": "jkv.reference",
    "dense_attend": "jkv.reference",
    "init_dense_cache": "jkv.reference",
    "reference_generate": "jkv.reference",
    "Tokenizer": "jkv.tokenizer",
    "get_tokenizer": "jkv.tokenizer",
    "CheckpointError": "jkv.weights",
    "load_model": "jkv.weights",
    "LLM": "jkv.engine",
    "Engine": "jkv.engine",
    "generate": "jkv.engine",
    "EngineStats": "jkv.outputs",
    "RequestMetrics": "jkv.request",
    "RequestOutput": "jkv.request",
    "SampleOutput": "jkv.request",
    "SamplingParams": "jkv.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:  # submodules as attributes (jkv.engine, jkv.request, ...), as a plain package gives them once imported
        return importlib.import_module(f"jkv.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"jkv.{name}":
            raise
        raise AttributeError(f"module 'jkv' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
