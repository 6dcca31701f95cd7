"""scripts/bench_warmup.py on the CPU: a child per thread count, warm-up then serving with no compilation, and
the same tokens from every child."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_warmup.py"
TINY = ROOT / "tests" / "fixtures" / "hf_tiny_gpt2"


def test_two_thread_counts_same_tokens_nothing_compiled_while_serving(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(TINY), "--batch", "2", "--max-seq-len", "32",
                           "--decode-steps", "2", "--threads", "2,1", "--out", str(out)],
                          capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "", "XLA_FLAGS": os.environ["XLA_FLAGS"]}, timeout=600,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["threads"] for r in rows] == [2, 1]
    for r in rows:
        assert r["shapes"] > 10 and r["compiles_while_serving"] == 0 and r["parallel_failures"] == 0
        assert r["compiles_in_warmup"] >= r["shapes"]  # one XLA compilation per shape at least
    assert rows[0]["tokens_sha256"] == rows[1]["tokens_sha256"]
    assert "tokens equal across rows" in proc.stdout


def test_bad_thread_list_is_one_clear_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--threads", "8,x"], capture_output=True, text=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "", "XLA_FLAGS": os.environ["XLA_FLAGS"]}, timeout=120, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "--threads 8,x: give positive integers, e.g. 8,1."


def test_compile_cache_row_loads_every_step_instead_of_compiling(tmp_path):
    # the first child fills the compile cache; the second, a fresh process, loads each stored executable from it
    out, cache = tmp_path / "rows.json", tmp_path / "xla-cache"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(TINY), "--batch", "2", "--max-seq-len", "32",
                           "--decode-steps", "2", "--threads", "2,2", "--compile-cache", str(cache), "--out", str(out)],
                          capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "", "XLA_FLAGS": os.environ["XLA_FLAGS"]}, timeout=600,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    cold, warm = json.loads(out.read_text())
    assert cold["executables_loaded"] == 0 and cold["compiles_in_warmup"] >= cold["shapes"]
    assert warm["compiles_in_warmup"] == 0 and warm["executables_loaded"] >= warm["shapes"] == cold["shapes"]
    assert warm["compiles_while_serving"] == 0 and warm["tokens_sha256"] == cold["tokens_sha256"]
