"""Tensor-parallel runs for tests/test_tp.py, in a process of its own: JAX must see several CPU devices
(`--xla_force_host_platform_device_count`) from the moment it starts, which the test workers' JAX no longer can.

    python tests/tp_checks.py single            one process, 4 CPU devices: every check; one JSON object on stdout
    python tests/tp_checks.py rank R PORT OUT   process R of 2 under jax.distributed (1 CPU device each) on
                                                127.0.0.1:PORT; process 0 writes its tokens to OUT as JSON

The XLA flags below trade the CPU compiler's optimization for compile time (each run compiles its steps anew);
every comparison is between runs of the same flags.
"""

import json
import os
import sys
import time

FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0 " \
               "--xla_cpu_parallel_codegen_split_count=1"  # fmt: skip


def _setup(devices: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# Engine shape: block 8 (the kernels' smallest), at most 4 rows and 32 tokens (few step shapes to compile), and a
# pool of 7 blocks (6 usable), which the workload below outgrows, so sequences are preempted and recomputed.
ENGINE = {"block_size": 8, "max_num_seqs": 4, "max_num_batched_tokens": 16, "max_seq_len": 32, "num_blocks": 7}


def gpt2_d64():
    """A random GPT-2 of head_dim 64 (4 heads, a shape the kernels take) whose tokens depend on the cached
    context."""
    from random_models import context_sensitive_gpt2

    return context_sensitive_gpt2("tiny-d64-h4", n_embd=256, n_head=4)


def workload(vocab: int):
    """Prompts and sampling that exercise prefix caching (two prompts share two full blocks), parallel samples
    (n=2), beam search and, in ENGINE's pool, preemption."""
    import numpy as np

    import jkv

    rng = np.random.default_rng(5)
    base = rng.integers(0, vocab, 16).tolist()
    prompts = [base + [1, 2], base + [3], rng.integers(0, vocab, 9).tolist(), rng.integers(0, vocab, 5).tolist()]
    sp = jkv.SamplingParams
    sampling = [sp(max_tokens=10, ignore_eos=True), sp(max_tokens=10, ignore_eos=True),
                sp(max_tokens=8, n=2, ignore_eos=True), sp(max_tokens=5, beam_width=2, ignore_eos=True)]  # fmt: skip
    return prompts, sampling


def run(model, tp: int, kv_dtype: str, attention: str = "reference") -> dict:
    """The workload's tokens (per request, per sample) and what the engine did."""
    import jkv

    t = time.perf_counter()
    eng = jkv.Engine(model, **ENGINE, tensor_parallel_size=tp, kv_dtype=kv_dtype, attention=attention)
    prompts, sampling = workload(model.config.vocab_size)
    ids = [eng.add_request(p, s) for p, s in zip(prompts, sampling)]
    final = eng.run()
    st = eng.stats()
    out = {"tokens": [[s.token_ids for s in final[i].samples] for i in ids], "preemptions": st.preemptions_recompute,
           "prefix_hit_rate": st.prefix_hit_rate, "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
    out["memory"] = step_memory(eng)
    eng.close()
    return out


def step_memory(eng) -> dict:
    """The compiled decode step's memory analysis on one device beside that device's share of the pools: with the
    pools donated and updated in place, the aliased bytes cover the pools and the temporaries hold no second pool."""
    import jax

    from jkv.runner import build_inputs, pack

    ex = eng.executor
    x = build_inputs([], block_size=eng.block_size, chunk=1, width=1, batch=1)
    fn = ex.runner.function(x, decode=True, greedy=True)
    args = (ex.runner.params, ex.kv.pools, *ex.runner.tp.inputs(*pack(x)), ex._tokens)
    mem = fn.executable(args).memory_analysis()  # the executable the run used: nothing is compiled again
    pool = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(ex.kv.pools))
    return {"pool_bytes": pool, "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes}


def allocation(model, tp: int, kv_dtype: str) -> dict:
    """Per-device bytes of an engine beside the planner's `--tp` figures for the same model and options: each
    tensor's shard shape beside the planner's per-device shape, and the pools' and parameters' bytes on every
    device beside the plan's. The pool is sized directly (a budget-sized one costs GiBs of host memory per
    device here); the engine sizes a planned pool as num_blocks x bytes_per_block, both checked."""
    import jkv
    from jkv.sharding import shard_bytes
    from jkv.weights import hf_tensor_names
    from kvspec.params import param_shapes
    from planner.plan import PlanOptions, make_plan

    num_blocks = 12
    eng = jkv.Engine(model, num_blocks=num_blocks, block_size=8, max_num_seqs=4, max_seq_len=64,
                     max_num_batched_tokens=16, tensor_parallel_size=tp, kv_dtype=kv_dtype)  # fmt: skip
    plan = make_plan(model.config, PlanOptions(hbm_bytes=2 * 10**9, dtype=str(model.dtype), kv_dtype=kv_dtype,
                                               block_size=8, max_seq_len=64, max_num_seqs=4, prefill_chunk=16,
                                               tp=tp))  # fmt: skip
    params, pools = eng.executor.runner.params, eng.executor.kv.pools
    planned = param_shapes(model.config, tp)
    wrong = []
    for name, (path, _) in hf_tensor_names(model.config).items():
        leaf = params
        for p in path:
            leaf = leaf[p]
        shard = tuple(leaf.addressable_shards[0].data.shape)
        want = planned.get(name, planned.get(name.removesuffix(".weight")))  # the planner names GPT-2's wte "wte"
        if want is None or shard != tuple(want):
            wrong.append(f"{name}: {shard} vs planned {want}")
    devices = list(eng.tp.mesh.devices.flat)
    out = {
        "wrong_shapes": wrong, "plan_param_bytes": plan.param_bytes, "num_blocks": num_blocks,
        "param_bytes": sorted({shard_bytes(params, d) for d in devices}),
        "pool_bytes": sorted({shard_bytes(pools, d) for d in devices}),
        "bytes_per_block": eng.bytes_per_block, "plan_bytes_per_block": plan.layout.bytes_per_block,
    }  # fmt: skip
    eng.close()
    return out


def single() -> dict:
    import jax

    from llama_fixtures import fixture

    assert jax.device_count() == 4, jax.devices()
    gpt2, (llama, _, _) = gpt2_d64(), fixture("llama")
    runs = {}
    # GPT-2 through the jnp reference attention; the Llama fixture (4 heads, 2 KV heads: tp 4 repeats each KV head
    # on two devices) through the interpreted Pallas kernels for float pages (the fused write-and-attend decode)
    for name, model, kv, tps, attention in [
        ("gpt2", gpt2, "bfloat16", (1, 2, 4), "reference"), ("gpt2", gpt2, "int8", (1, 2), "reference"),
        ("llama", llama, "bfloat16", (1, 2, 4), "interpret"), ("llama", llama, "int8", (1, 4), "reference"),
    ]:  # fmt: skip
        for tp in tps:
            runs[f"{name}/{kv}/tp{tp}"] = run(model, tp, kv, attention)
    alloc = {}
    from jkv.model import Model
    from jkv.weights import random_params
    from kvspec.config import ModelConfig

    odd = ModelConfig("gpt2-v250", vocab_size=250, n_positions=64, n_embd=256, n_layer=1, n_head=4, tie_word_embeddings=False)
    odd_model = Model(odd, random_params(odd, "float32"), "float32", "gpt2-v250")  # 250 rows: padded to 4 x 63
    for name, model, kv in [("gpt2-v250", odd_model, "bfloat16"), ("llama", llama, "int8")]:
        for tp in (1, 2, 4):
            alloc[f"{name}/{kv}/tp{tp}"] = allocation(model, tp, kv)
    return {"runs": runs, "allocation": alloc}


def rank(process: int, port: str, out: str) -> None:
    """One of two processes under jax.distributed: the Llama fixture at tp 2 over both processes' devices."""
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process, initialization_timeout=60)
    from llama_fixtures import fixture

    import jkv

    llama, _, _ = fixture("llama")
    assert jax.device_count() == 2 and jax.local_device_count() == 1
    eng = jkv.Engine(llama, **ENGINE, tensor_parallel_size=2, kv_dtype="int8", attention="reference")
    if process == 0:
        prompts, sampling = workload(llama.config.vocab_size)
        ids = [eng.add_request(p, s, request_id=f"r{i}") for i, (p, s) in enumerate(zip(prompts, sampling))]
        final = eng.run()
        result = {"tokens": [[s.token_ids for s in final[i].samples] for i in ids],
                  "preemptions": eng.stats().preemptions_recompute}  # fmt: skip
        eng.close()  # ends process 1's follow()
        with open(out, "w") as f:
            json.dump(result, f)
    else:
        eng.follow()
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "single":
        _setup(4)
        print(json.dumps(single()))
    else:
        _setup(1)
        rank(int(sys.argv[2]), sys.argv[3], sys.argv[4])
