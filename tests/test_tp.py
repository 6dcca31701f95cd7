"""Tensor parallelism (jkv.sharding) on CPU devices: tokens at tp 2 and 4 equal tp 1, per-device allocation equals
the planner's `--tp` figures, donation holds per shard, and two jax.distributed processes give one process's
tokens. The runs are in subprocesses (tests/tp_checks.py): the device count is fixed when JAX starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import jkv
from jkv.serve.cli import main as serve_main

CHECKS = Path(__file__).with_name("tp_checks.py")
ROOT = CHECKS.parent.parent
FIXTURE = CHECKS.parent / "fixtures" / "hf_tiny_gpt2"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # tp_checks sets its own device count
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def single() -> dict:
    r = subprocess.run([sys.executable, str(CHECKS), "single"], capture_output=True, text=True, env=_env(),
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["gpt2/bfloat16", "gpt2/int8", "llama/bfloat16", "llama/int8"])
def test_tokens_at_every_tp_equal_tp1(single, family):
    runs = {k.rsplit("/", 1)[1]: v for k, v in single["runs"].items() if k.startswith(family + "/")}
    assert len(runs) >= 2 and "tp1" in runs
    base = runs["tp1"]
    # the workload is what the issue asks: prefix hits, preemption (recompute), n=2 and beams, varied tokens
    assert base["preemptions"] > 0 and base["prefix_hit_rate"] > 0
    assert len({t for req in base["tokens"] for s in req for t in s}) > 10
    for tp, run in runs.items():
        assert run["tokens"] == base["tokens"], f"{family} {tp}"
        assert run["preemptions"] == base["preemptions"], f"{family} {tp}: the same host schedule"


def test_pools_are_donated_per_shard_and_split_by_kv_heads(single):
    for name, run in single["runs"].items():
        mem = run["memory"]
        assert mem["alias_bytes"] == mem["pool_bytes"] > 0, name  # every pool buffer updated in place, per device
        if "llama/bfloat16" not in name:  # the interpreted Pallas kernels keep their own scratch copies on the CPU
            assert mem["temp_bytes"] < mem["pool_bytes"], name  # no second pool among the temporaries
    pools = {k: v["memory"]["pool_bytes"] for k, v in single["runs"].items()}
    assert pools["gpt2/bfloat16/tp2"] * 2 == pools["gpt2/bfloat16/tp4"] * 4 == pools["gpt2/bfloat16/tp1"]
    # the Llama fixture has 2 KV heads: tp 4 holds one (repeated) KV head per device, as tp 2 does
    assert pools["llama/bfloat16/tp2"] * 2 == pools["llama/bfloat16/tp1"] == pools["llama/bfloat16/tp4"] * 2


def test_per_device_allocation_equals_the_plan(single):
    alloc = single["allocation"]
    for name, a in alloc.items():
        assert a["wrong_shapes"] == [], name  # every tensor's shard shape is the planner's per-device shape
        assert a["param_bytes"] == [a["plan_param_bytes"]], name  # the same bytes on every device, as planned
        assert a["bytes_per_block"] == a["plan_bytes_per_block"], name
        assert a["pool_bytes"] == [a["num_blocks"] * a["bytes_per_block"]], name
    per_block = {k: v["bytes_per_block"] for k, v in alloc.items()}
    assert per_block["gpt2-v250/bfloat16/tp1"] == 2 * per_block["gpt2-v250/bfloat16/tp2"] == 4 * per_block[
        "gpt2-v250/bfloat16/tp4"
    ]  # 1/N with N <= KV heads
    assert per_block["llama/int8/tp1"] == 2 * per_block["llama/int8/tp2"] == 2 * per_block["llama/int8/tp4"]
    # a vocabulary of 250 over 4 devices: 63 rows each (the last part zero-padded), as the planner counts
    assert alloc["gpt2-v250/bfloat16/tp4"]["plan_param_bytes"] < alloc["gpt2-v250/bfloat16/tp1"]["plan_param_bytes"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_jax_distributed_give_one_process_tokens(single, tmp_path):
    out, port = tmp_path / "tokens.json", str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(CHECKS), "rank", str(r), port, str(out)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
             for r in (0, 1)]  # fmt: skip
    try:
        results = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
    got = json.loads(out.read_text())
    base = single["runs"]["llama/int8/tp1"]
    assert got["tokens"] == base["tokens"] and got["preemptions"] == base["preemptions"] > 0


@pytest.fixture(scope="module")
def gpt2():
    return jkv.load_model(str(FIXTURE), dtype="float32")


@pytest.mark.parametrize(
    "size, words",
    [
        (3, "tensor_parallel_size=3 must divide"),  # 4 heads
        (2, "needs 2 devices but JAX sees 1"),
        (0, "must be a positive integer"),
        (True, "must be a positive integer"),
    ],
)
def test_bad_tensor_parallel_sizes_are_one_clear_line(gpt2, size, words):
    with pytest.raises(ValueError) as err:
        jkv.Engine(gpt2, num_blocks=8, block_size=4, max_num_seqs=2, tensor_parallel_size=size)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_serve_flag_reaches_the_engine(capsys):
    assert serve_main(["--model", str(FIXTURE), "--dtype", "float32", "--num-blocks", "8", "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jkv serve: tensor_parallel_size=2 needs 2 devices") and "\n" not in err
