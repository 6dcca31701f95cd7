"""jkv.bench.kv_quality (scripts/eval_kv_quality.py): the smoke mode end to end on the CPU, and its device-side
metrics against jkv.scoring.quality_metrics."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jkv.bench import kv_text
from jkv.bench.kv_quality import EvalOptions, evaluate, summarize
from jkv.scoring import quality_metrics

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_kv_quality.py"


def test_summarize_equals_quality_metrics():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7, 50)).astype(np.float32)
    ref = logits + 0.3 * rng.standard_normal(logits.shape).astype(np.float32)
    logsm = lambda x: (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)
    logp, ref_logp = logsm(logits), logsm(ref)
    targets = rng.integers(0, 50, (5, 7))
    got = summarize(logp, ref_logp, targets, rows=2)
    want = quality_metrics(logp, ref_logp, targets)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def test_eval_text_is_not_training_text():
    docs, modules = kv_text.eval_documents()
    train, val = kv_text.train_documents(set(docs))
    assert len(train) > 1000 and len(val) >= 100 and len(docs) > 100 and len(modules) > 50
    assert not set(train) & set(val) and not set(docs) & set(train + val)
    # No source file of an evaluation module (or its submodules) feeds the training text.
    everything = set(kv_text.stdlib_docstrings())
    held_out = everything - set(kv_text.stdlib_docstrings(kv_text.EVAL_MODULES))
    assert held_out and not held_out & set(train + val)


def test_smoke_end_to_end(tmp_path):
    out = tmp_path / "kv.json"
    result = evaluate(EvalOptions(smoke=True, json=str(out)))
    saved = json.loads(out.read_text())
    labels = [r["label"] for r in saved["rows"]]
    assert labels == ["bfloat16", "int8", "float8_e4m3fn", "int4", "bfloat16 W=8", "bfloat16 (jnp attention)"]
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["bfloat16"]["delta_ppl_pct"] == 0 and rows["bfloat16"]["mean_kl"] == 0
    for r in result["rows"]:
        assert np.isfinite(r["ppl"]) and r["mean_kl"] >= -1e-6 and 0 <= r["top1_agreement"] <= 1
    # Pool bytes per token from the planner: int8 = (32 + 2) / 64 of bf16 at the smoke model's head_dim 32.
    assert rows["int8"]["kv_bytes_per_token"] * 64 == rows["bfloat16"]["kv_bytes_per_token"] * 34
    assert rows["int4"]["kv_bytes_per_token"] < rows["int8"]["kv_bytes_per_token"]
    assert {t["kv"] for t in result["targets"]} == {"int8", "float8_e4m3fn", "int4"}
    assert saved["targets"] == result["targets"]
    assert result["training"]["steps_run"] == 4 and result["eval_text"]["tokens_scored"] == 2 * 8


def test_smoke_options_win_over_the_defaults_and_the_cli_lists_them():
    opts = EvalOptions(smoke=True, steps=500, prefix=100)  # --smoke --steps 500: the smoke settings stay
    assert (opts.steps, opts.prefix, opts.block_size, opts.windows) == (4, 8, 4, "8")
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and "--smoke" in r.stdout and "--no-control" in r.stdout
