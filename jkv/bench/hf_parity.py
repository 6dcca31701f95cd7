"""The JAX side of the Hugging Face parity check: jkv loads the random GPT-2 that `jkv.bench.hf_torch.hf_stage`
saved, and compares its logits (float32, float32 under a global "highest" matmul precision, bfloat16) and its
greedy tokens (`jkv.reference_generate`, cache and full recompute) against HF's float64 outputs there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

import jkv


def jkv_stage(size: str, new: int, work: Path) -> dict:
    """JAX on its default device: load work/model with jkv and compare with work/hf.*."""
    t0 = time.time()
    info = json.loads((work / "hf.json").read_text())
    ids, prompts, hf_greedy = info.pop("ids"), info.pop("prompts"), info.pop("greedy")
    ref = np.load(work / "hf.npz")
    hf64 = ref["hf64"]
    result = {"size": size, **info, "jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}
    result["max_abs_logit"] = float(np.abs(hf64).max())
    result["hf_float32_vs_float64"] = float(np.abs(ref["hf32"] - hf64).max())
    m32 = jkv.load_model(work / "model", dtype="float32")
    result["jkv_float32"] = float(np.abs(m32.logits(ids) - hf64).max())
    with jax.default_matmul_precision(
        "highest"
    ):  # jkv sets HIGHEST for float32 itself: this should not matter
        result["jkv_float32_global_highest"] = float(np.abs(m32.logits(ids) - hf64).max())
    greedy = jkv.reference_generate(m32, prompts, new)
    result["greedy_equal_hf"] = greedy == hf_greedy
    result["greedy_cache_equals_recompute"] = greedy == jkv.reference_generate(
        m32, prompts, new, use_cache=False
    )
    result["greedy_matching_prefix"] = [
        next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(greedy, hf_greedy)
    ]
    del m32
    lbf = jkv.load_model(work / "model", dtype="bfloat16").logits(ids)
    result["jkv_bfloat16_rel"] = float(np.abs(lbf - hf64).max()) / result["max_abs_logit"]
    result["jkv_bfloat16_argmax_agree"] = float((lbf.argmax(-1) == hf64.argmax(-1)).mean())
    result["jkv_seconds"] = round(time.time() - t0, 1)
    return result
