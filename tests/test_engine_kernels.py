"""The engine through the Pallas kernels (interpreted on CPU) against the engine through the jnp references.

The kernel path differs from the reference path in exactly what the GPU runs: decode steps over float pools write
the token's K/V and attend in one kernel (`paged_decode_attention_write`, reading q/k/v out of the QKV projection's
output), prefill chunks go through the prefill kernel. The reference path scatters the K/V and then attends in jnp.
Greedy tokens must agree under the features that move blocks around: prefix sharing, copy-on-write of forks,
block-boundary crossings, a sliding window and a quantized pool (which keeps the separate scatter).
"""

import numpy as np
import pytest

import jkv
from random_models import context_sensitive_gpt2  # tests/random_models.py


@pytest.fixture(scope="module")
def model():
    # head_dim 64: a shape the kernels take (the HF test fixture has head_dim 8)
    return context_sensitive_gpt2("tiny-d64", n_embd=128, n_head=2)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, 20).tolist()
    lengths = [1, 7, 8, 9, 17, 33]
    return [rng.integers(0, 256, n).tolist() for n in lengths] + [base + [1, 2], base + [3]]  # shared prefix


def generate(model, prompts, attention, **opts):
    sampling = [jkv.SamplingParams(max_tokens=12, n=2 if i == 2 else 1) for i in range(len(prompts))]
    eng = jkv.Engine(model, num_blocks=opts.pop("num_blocks", 96), block_size=8, max_num_seqs=8,
                     max_num_batched_tokens=32, attention=attention, **opts)  # fmt: skip
    ids = [eng.add_request(p, s) for p, s in zip(prompts, sampling)]
    final = eng.run()
    return [[x.token_ids for x in final[i].samples] for i in ids], eng


@pytest.mark.parametrize("opts,agree", [
    ({}, 12),  # float32 pool: the fused write-and-attend decode kernel; every token agrees
    ({"sliding_window": 24}, 12),
    # multi-step decode: the fused kernel inside the device loop, forks and shared prefixes included
    ({"decode_steps": 4}, 12),
    # int8 pool: scatter, then the decode kernel, which dots in bfloat16 where the reference dequantizes to float32,
    # so sequences may part after a few greedy near-ties; the first 3 tokens of every sample must agree
    ({"kv_dtype": "int8"}, 3),
])  # fmt: skip
def test_kernel_engine_equals_reference_engine(model, prompts, opts, agree):
    want, _ = generate(model, prompts, "reference", **{k: v for k, v in opts.items() if k != "decode_steps"})
    got, eng = generate(model, prompts, "interpret", **dict(opts))
    assert eng.executor.runner.backend == "interpret"
    assert [[x[:agree] for x in r] for r in got] == [[x[:agree] for x in r] for r in want]
    assert all(len(x) == 12 for r in got for x in r)
    assert eng.stats().prefix_hit_rate > 0  # the shared prompt blocks were reused
