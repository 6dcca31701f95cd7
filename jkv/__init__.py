"""jkv: paged KV-cache engine for GPT-2 on JAX (model, block manager, scheduler, engine)."""

from jkv.model import AttentionFn, Model, attend_no_cache, forward
from jkv.reference import DenseCache, dense_attend, init_dense_cache, reference_generate
from jkv.tokenizer import Tokenizer, get_tokenizer
from jkv.weights import CheckpointError, load_model

__all__ = [
    "AttentionFn",
    "CheckpointError",
    "DenseCache",
    "Model",
    "Tokenizer",
    "attend_no_cache",
    "dense_attend",
    "forward",
    "get_tokenizer",
    "init_dense_cache",
    "load_model",
    "reference_generate",
]

from jkv.engine import LLM, Engine, generate  # noqa: E402
from jkv.outputs import EngineStats  # noqa: E402
from jkv.request import RequestMetrics, RequestOutput, SampleOutput  # noqa: E402
from jkv.sampling import SamplingParams  # noqa: E402

__all__ += ["LLM", "Engine", "EngineStats", "RequestMetrics", "RequestOutput", "SampleOutput", "SamplingParams", "generate"]
