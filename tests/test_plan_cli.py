"""scripts/plan.py end to end: the report, the JSON contract, and one-line errors with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "plan.py"), *args], capture_output=True, text=True)


def test_report_runs():
    r = run_plan("--hbm", "24GB")
    assert r.returncode == 0, r.stderr
    for text in ("36,864 B", "124,439,808", "KV pool", "runtime reserve", "quadratically", "static"):
        assert text in r.stdout


def test_json_matches_hand_calculation():
    r = run_plan("--hbm", "24GiB", "--model", "gpt2-xl", "--kv-dtype", "bfloat16", "--block-size", "32", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["hbm_bytes"] == 24 * 2**30
    assert d["param_bytes"] == 2 * 1_557_611_200
    assert d["kv_bytes_per_token"] == 300 * 1024
    assert d["bytes_per_block"] == 32 * 300 * 1024
    left = int(24 * 2**30 * 0.9) - d["param_bytes"] - d["activation_bytes"] - d["reserve_bytes"]
    assert d["num_blocks"] == left // d["bytes_per_block"]
    assert d["kv_pool_bytes"] == d["num_blocks"] * d["bytes_per_block"]
    assert d["max_batch_by_seq_len"]["1024"] == min(d["max_num_seqs"], (d["num_blocks"] - 1) // 32)
    assert d["prefill_chunk"] == 2048 and d["prefill_step_positions"] == 2048  # the default budget, padded


def test_json_prefill_positions_round_the_budget_up():
    d = json.loads(run_plan("--hbm", "24GB", "--prefill-chunk", "1000", "--json").stdout)
    assert (d["prefill_chunk"], d["prefill_step_positions"]) == (1000, 1024)


def test_tp_json():
    one = json.loads(run_plan("--hbm", "24GB", "--model", "gpt2-medium", "--json").stdout)
    two = json.loads(run_plan("--hbm", "24GB", "--model", "gpt2-medium", "--tp", "2", "--json").stdout)
    assert two["kv_bytes_per_token"] * 2 == one["kv_bytes_per_token"]
    assert two["param_bytes"] < one["param_bytes"]
    assert two["num_blocks"] > one["num_blocks"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--hbm", "24GB", "--model", "gpt5"], "unknown model"),
        (["--hbm", "24XB"], "unknown unit"),
        (["--hbm", "-3GB"], "must be positive"),
        (["--hbm", "1GB", "--model", "gpt2-xl", "--dtype", "float32"], "cannot hold"),
        (["--hbm", "24GB", "--block-size", "12"], "power of two"),
        (["--hbm", "24GB", "--block-size", "abc"], "whole number"),
        (["--hbm", "24GB", "--kv-dtype", "int3"], "unknown KV dtype"),
        (["--hbm", "24GB", "--utilization", "1.5"], "utilization"),
        (["--hbm", "24GB", "--tp", "5"], "--tp 5"),
        (["--hbm", "24GB", "--max-seq-len", "5000"], "max-seq-len"),
        (["--model", "gpt2"], "--hbm"),
    ],
)
def test_bad_input_one_line_exit_2(args, needle):
    r = run_plan(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_directory_without_config(tmp_path):
    r = run_plan("--hbm", "24GB", "--model", str(tmp_path))
    assert r.returncode == 2 and "config.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_hf_directory(tmp_path):
    cfg = {"model_type": "gpt2", "n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 256, "vocab_size": 500}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    d = json.loads(run_plan("--hbm", "2GB", "--model", str(tmp_path), "--json").stdout)
    assert d["kv_bytes_per_token"] == 2 * 2 * 4 * 32 * 2
    assert set(d["max_batch_by_seq_len"]) == {"128", "256"}
