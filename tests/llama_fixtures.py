"""The Llama-family fixtures shared by tests/test_llama.py and tests/test_llama_engine.py.

tests/fixtures/hf_tiny_llama/ (made offline by scripts/make_llama_fixtures.py with transformers 5.24 and CPU
torch): float64 logits and greedy continuations of five tiny random models (llama with llama3 RoPE scaling,
mistral with an 8-token window, qwen2 with QKV bias and a tied head, qwen3 with q/k norms, llama with YaRN and
biases), and transformers' own rotary frequencies for 13 RoPE configurations. The weights are bfloat16 values,
so loading them in float32 is exact. Prompts plus continuations are 31 and 37 tokens.
"""

import functools
import json
from pathlib import Path

import numpy as np

import jkv

FIXTURES = Path(__file__).parent / "fixtures" / "hf_tiny_llama"
NAMES = ("llama", "mistral", "qwen2", "qwen3", "llama_yarn")
NEW = 24  # greedy tokens per fixture prompt
# One engine shape for the fixture runs: block 8 (the kernels' smallest), chunks of 8 tokens so both prompts
# are prefilled in pieces, room for every sequence without preemption.
ENGINE = {"num_blocks": 40, "block_size": 8, "max_num_seqs": 8, "max_num_batched_tokens": 8}


@functools.cache
def fixture(name: str) -> tuple[jkv.Model, dict, np.ndarray]:
    """(the model in float32, expected.json, transformers' float64 logits for expected['ids'])."""
    d = FIXTURES / name
    expected = json.loads((d / "expected.json").read_text())
    return jkv.load_model(d, dtype="float32"), expected, np.load(d / "logits.npz")["logits"]


def greedy(max_tokens: int = NEW, **kw) -> jkv.SamplingParams:
    """Greedy past the models' EOS ids, as the fixtures' continuations were made."""
    return jkv.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)
