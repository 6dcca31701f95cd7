"""Repeated offline generation in one process: each `jkv.generate` call's wall time, tokens/s, XLA compilations
and device bytes in use afterwards (a long-lived process must pay only for its tokens after the first call)."""

from __future__ import annotations

import time

import jax
import numpy as np

import jkv
import jkv.engine as engine_module


def repeat_generate(model, *, calls: int, batch: int, prompt_len: int, new_tokens: int, seed: int = 0,
                    **engine_options) -> list[dict]:  # fmt: skip
    """Run `calls` identical `jkv.generate` calls of `batch` random prompts; one record per call. Every call must
    return the first call's tokens (greedy)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, model.config.vocab_size, prompt_len).tolist() for _ in range(batch)]
    sp = jkv.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    records, first = [], None
    for i in range(calls):
        t0 = time.perf_counter()
        outs = jkv.generate(model, prompts, sp, **engine_options)
        wall = time.perf_counter() - t0
        tokens = [o.token_ids for o in outs]
        first = first or tokens
        engine = engine_module.generate_engine()
        mem = jax.devices()[0].memory_stats() or {}
        records.append({"call": i + 1, "seconds": wall, "tok_per_s": batch * new_tokens / wall,
                        "same_tokens": tokens == first, "compilations_total": engine.stats().compilations,
                        "bytes_in_use": mem.get("bytes_in_use"), "engine_id": id(engine)})  # fmt: skip
    return records
