"""scripts/bench_generate.py's online mode on the CPU: Poisson arrivals, an open loop, latency from arrival."""

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

import jkv

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "scripts" / "bench_generate.py")
bg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bg)


def test_poisson_arrivals_are_seeded_increasing_at_the_rate():
    a = bg.poisson_arrivals(4000, 50.0)
    assert a == bg.poisson_arrivals(4000, 50.0) and np.all(np.diff(a) > 0)
    assert 4000 / a[-1] == pytest.approx(50.0, rel=0.1)  # mean gap 1 / rate


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_online_requests_start_after_they_arrive(monkeypatch, decode_steps):
    model = jkv.load_model(ROOT / "tests" / "fixtures" / "hf_tiny_gpt2", dtype="float32")
    eng = jkv.Engine(model, num_blocks=64, block_size=4, max_num_seqs=4, decode_steps=decode_steps)
    rng = np.random.default_rng(3)
    reqs = [(rng.integers(0, model.config.vocab_size, 6).tolist(), 5) for _ in range(5)]
    arrivals = [0.0, 0.0, 0.3, 0.35, 0.9]  # seconds, spread over the run
    added, slept = [], []
    real_add, real_sleep = eng.add_request, time.sleep
    monkeypatch.setattr(eng, "add_request", lambda *a, **k: added.append(time.monotonic()) or real_add(*a, **k))
    monkeypatch.setattr(bg.time, "sleep", lambda d: slept.append((d, eng.has_unfinished())) or real_sleep(d))
    t0 = time.monotonic()
    got = bg.drive_online(eng, reqs, arrivals)
    assert len(added) == len(reqs)
    for at, a in zip(added, arrivals):
        assert at >= t0 + a  # never added before its arrival
    assert not any(busy for _, busy in slept)  # it waits for the next arrival only when idle
    assert got["online_ttft_ms_p50"] > 0 and got["online_tpot_ms_p50"] > 0
    assert got["online_tok_s"] == pytest.approx(25 / (time.monotonic() - t0), rel=0.5)
    assert not eng.has_unfinished()
    # compiled now: one short request, then a long pause before the next one; the idle engine sleeps through it
    slept.clear()
    bg.drive_online(eng, reqs[:2], [0.0, 2.0])
    assert slept and sum(d for d, _ in slept) > 0.5 and not any(busy for _, busy in slept)
