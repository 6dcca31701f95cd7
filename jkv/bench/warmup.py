"""How long `Engine.warmup()` takes at a number of compile threads, and whether it covers every step shape that
serving meets: one fresh process per thread count (`jkv.bench.child`), so nothing is compiled before its warm-up.

A child builds a random-weight bfloat16 engine, times `warmup(greedy=True, threads=N)`, then serves a seeded mixed
workload (3 x batch requests arriving two engine steps apart, so the batch varies) and counts XLA compilations
(JAX's monitoring events) made while serving; the hash of its greedy tokens lets the parent check that every
thread count produced the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

from jkv.bench import CheckFailed
from jkv.bench import child as harness

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
BLOCK_SIZE = 16


def warmup_child(model: str, batch: int, max_seq_len: int, decode_steps: int, threads: int,
                 compile_cache: str | None = None) -> dict:  # fmt: skip
    """One thread count's row (module docstring), in a fresh process."""
    started = time.perf_counter()
    import warnings

    import jax
    import numpy as np

    import jkv

    jax.devices()  # the backend's start belongs to the imports' share
    imported = time.perf_counter()
    warnings.filterwarnings("ignore", message=".*(random|tokenizer).*")
    m = jkv.load_model(model, dtype="bfloat16")
    jax.block_until_ready(m.params)
    weighed = time.perf_counter()
    bs = BLOCK_SIZE
    eng = jkv.Engine(m, num_blocks=batch * -(-max_seq_len // bs) + 1, block_size=bs, max_num_seqs=batch,
                     max_seq_len=max_seq_len, max_num_batched_tokens=2048, enable_prefix_caching=False,
                     decode_steps=decode_steps, compile_cache_dir=compile_cache)  # fmt: skip
    compiles: list[float] = []
    hits: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(duration) if event == COMPILE_EVENT else None
    )
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(event) if event == CACHE_HIT_EVENT else None
    )
    built = time.perf_counter()
    report = eng.warmup(greedy=True, threads=threads)
    start_s = time.perf_counter() - started  # imports, random weights, engine, warm-up: ready to serve
    split = {"imports_s": imported - started, "weights_s": weighed - imported, "engine_s": built - weighed,
             "warmup_prepare_s": report["prepare_seconds"], "warmup_run_s": report["run_seconds"]}  # fmt: skip
    warm_compiles, warm_hits = len(compiles), len(hits)
    rng = np.random.default_rng(0)
    reqs = []
    for _ in range(3 * batch):
        p = int(rng.integers(1, max_seq_len // 2))
        reqs.append((rng.integers(0, m.config.vocab_size, p).tolist(), int(rng.integers(1, max_seq_len - p))))
    final, step, t0 = {}, 0, time.perf_counter()
    while len(final) < len(reqs):
        if step % 2 == 0 and step // 2 < len(reqs):
            prompt, n = reqs[step // 2]
            eng.add_request(
                prompt, jkv.SamplingParams(max_tokens=n, ignore_eos=True), request_id=f"r{step // 2}"
            )
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        step += 1
    digest = hashlib.sha256(json.dumps([final[f"r{i}"] for i in range(len(reqs))]).encode()).hexdigest()[:16]
    # JAX reports a compile event for an executable loaded from the persistent cache too: those are not compiles.
    return {"threads": threads, "shapes": report["shapes"], "warmup_s": report["seconds"],
            "parallel_failures": report["parallel_failures"], "compiles_in_warmup": warm_compiles - warm_hits,
            "compiles_while_serving": len(compiles) - warm_compiles - (len(hits) - warm_hits),
            "serve_s": time.perf_counter() - t0,
            "cache_loads_in_warmup": warm_hits, "compile_cache": compile_cache, "start_s": start_s,
            "executables_loaded": report["loaded"],
            "tokens_sha256": digest, "device": jax.devices()[0].device_kind, "jax": jax.__version__} | split  # fmt: skip


def thread_rows(model: str, batch: int, max_seq_len: int, decode_steps: int, counts: list[int],
                compile_cache: str | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:  # fmt: skip
    """`warmup_child` per thread count, one process after another (with compile_cache, the first fills jkv's
    executable store and the later ones load from it); on_row(row) as each finishes. Raises RuntimeError when a
    child fails and CheckFailed when the children's greedy tokens differ."""
    rows = []
    for t in counts:
        kwargs = {"model": model, "batch": batch, "max_seq_len": max_seq_len, "decode_steps": decode_steps,
                  "threads": t, "compile_cache": compile_cache}  # fmt: skip
        done = harness.run("jkv.bench.warmup:warmup_child", kwargs, dict(os.environ))
        if done.returncode or done.result is None:
            raise RuntimeError(f"the threads={t} child failed:\n{done.stderr[-2000:]}")
        rows.append(done.result)
        if on_row is not None:
            on_row(done.result)
    if len({r["tokens_sha256"] for r in rows}) != 1:
        raise CheckFailed("the children's greedy tokens differ: parallel compilation changed a result.")
    return rows
