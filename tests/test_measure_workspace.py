"""jkv.bench.workspace (scripts/measure_workspace.py) on the CPU: argument parsing, the least-free-memory search's
narrowing (a fake child with a known need), and the compile-only sweep on the tiny fixture model."""

import sys
from pathlib import Path

import pytest

from jkv.bench import memory
from jkv.bench import workspace as mw

ROOT = Path(__file__).resolve().parents[1]

MiB = 2**20


def test_parse_rows():
    assert mw.parse_rows(["gpt2:int8:1,40", "gpt2-xl:bfloat16:3"]) == [
        ("gpt2", "int8", 1), ("gpt2", "int8", 40), ("gpt2-xl", "bfloat16", 3)]  # fmt: skip
    for bad in ("gpt2:int8", "gpt2:int8:", "gpt2"):
        with pytest.raises(ValueError, match="must read MODEL:KV_DTYPE:B1,B2"):
            mw.parse_rows([bad])


@pytest.mark.parametrize("spec", ["gpt2:bfloat16:4096:700", "gpt2:bfloat16:4096:1800:700", "gpt2:bf16:x:1:2"])
def test_bad_free_spec_is_one_clear_line(spec):
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "measure_workspace.py"), "--free", spec],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode != 0 and "must read MODEL:KV_DTYPE:BATCH:LO_MIB:HI_MIB" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("width", [2, 6])
def test_free_search_narrows_to_the_need(width):
    """Each try reports the free bytes it got (the asked bytes minus a little allocator rounding); the bounds
    always bracket the need and shrink every round."""
    needs = {("gpt2", "bfloat16", 4033): 900.8 * MiB, ("gpt2-xl", "bfloat16", 444): 315.0 * MiB}
    asked = []

    def fake_children(jobs, env, w):
        assert w == width and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.05"
        out = []
        for target, kw in jobs:
            assert target == "jkv.bench.workspace:free_child"
            m, kv, b, f = kw["model_name"], kw["kv"], kw["batch"], kw["free"]
            asked.append(f)
            free = f - 256
            ok = free >= needs[(m, kv, b)]
            out.append({"model": m, "kv_dtype": kv, "batch": b, "free": free, "compile_ok": ok, "run_ok": ok})
        return out

    targets = [("gpt2", "bfloat16", 4033, 700, 1800), ("gpt2-xl", "bfloat16", 444, 200, 400)]
    found = mw.free_search(targets, width, 5, run=fake_children, log=lambda line: None)
    for f in found:
        need = needs[(f["model"], f["kv_dtype"], f["batch"])]
        assert f["need_above"] < need <= f["need_at_most"]
        assert f["need_at_most"] - f["need_above"] <= (1800 - 700) * MiB / 2**5 + MiB  # at least halved a round
        assert len(f["tries"]) == 5 * max(1, width // 2)


def test_sweep_child_on_the_cpu(monkeypatch):
    monkeypatch.setattr(memory, "gpu_used_bytes", lambda: 0)
    fixture = str(ROOT / "tests" / "fixtures" / "hf_tiny_gpt2")
    out = mw.sweep_child(fixture, "bfloat16", [3, 40])
    assert set(out["decode"]) == {3, 40}
    for b, d in out["decode"].items():
        assert d["output"] - d["alias"] >= b * 4  # at least the float32 logits of b rows (vocab >= 1)
        assert d["planned_activation"] > 0
    assert out["decode"][40]["output"] > out["decode"][3]["output"]
    assert out["prefill"]["temp"] > 0 and out["prefill_step"][2] >= 1


def test_children_run_side_by_side_each_with_its_own_env(tmp_path):
    """run_children starts the jobs' children `width` at a time, one env each (the --dump row gets its own
    XLA_FLAGS), and returns their RESULTs in order."""
    import os

    fake = tmp_path / "nvidia-smi"  # the sweep child reads the card's used memory first; none on a CPU box
    fake.write_text("#!/bin/sh\necho 0\n")
    fake.chmod(0o755)
    fixture = str(ROOT / "tests" / "fixtures" / "hf_tiny_gpt2")
    base = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", JAX_PLATFORMS="cpu")
    envs = [base, dict(base, XLA_FLAGS="--xla_dump_to=" + str(tmp_path / "dump"))]
    jobs = [("jkv.bench.workspace:sweep_child", {"model_name": fixture, "kv": "bfloat16", "batches": [b]}) for b in (3, 5)]
    out = mw.run_children(jobs, envs, 2)
    assert [sorted(r["decode"]) for r in out] == [["3"], ["5"]]  # JSON keys
    assert (tmp_path / "dump").is_dir() and any((tmp_path / "dump").iterdir())
