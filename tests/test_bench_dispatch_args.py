"""jkv.bench.dispatch on the CPU (scripts/bench_dispatch_args.py): one row per (arguments, donated) pair, each
result checked first."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jkv.bench import CheckFailed
from jkv.bench.dispatch import time_dispatch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_dispatch_args.py"


def test_rows_per_argument_count_and_donation():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--counts", "1,8", "--donate", "0,4", "--calls", "5"],
                          capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "", "XLA_FLAGS": os.environ["XLA_FLAGS"]}, timeout=300,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [ln.split() for ln in proc.stdout.splitlines()[2:]]
    # the donated count is capped at the argument count: (1, 0), (1, 1), (8, 0), (8, 4)
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 0), (1, 1), (8, 0), (8, 4)]
    assert all(float(r[2]) > 0 for r in rows)


def test_wrong_sum_is_caught():
    def broken(n, donate):  # a function that drops its last array: the check before timing must refuse it
        import jax

        return jax.jit(lambda *a: (sum(x[0] for x in a[:-1]), tuple(x + 1.0 for x in a[:donate])))

    with pytest.raises(CheckFailed, match="wrong result"):
        time_dispatch(3, 0, 2, make=broken)
