"""jkv.bench.serving's online mode (scripts/bench_generate.py --arrival-rate) on the CPU: Poisson arrivals, an open
loop on a fake clock, latency from arrival. Nothing here depends on how fast the machine is: the loop's time is
the fake clock's, which moves only as the loop reads it and sleeps."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jkv
from jkv.bench.serving import drive_online, poisson_arrivals

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """Time that advances `tick` seconds on every reading (the loop's own work takes time) and by exactly the
    requested seconds on every sleep; `slept` records (seconds, whether the engine had work) per sleep."""

    def __init__(self, eng, tick: float = 0.01):
        self.now, self.tick, self.eng, self.slept = 1000.0, tick, eng, []

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append((seconds, self.eng.has_unfinished()))
        self.now += seconds


def test_poisson_arrivals_are_seeded_increasing_at_the_rate():
    a = poisson_arrivals(4000, 50.0)
    assert a == poisson_arrivals(4000, 50.0) and np.all(np.diff(a) > 0)
    assert 4000 / a[-1] == pytest.approx(50.0, rel=0.1)  # mean gap 1 / rate


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_online_requests_start_after_they_arrive(decode_steps):
    model = jkv.load_model(ROOT / "tests" / "fixtures" / "hf_tiny_gpt2", dtype="float32")
    eng = jkv.Engine(model, num_blocks=64, block_size=4, max_num_seqs=4, decode_steps=decode_steps)
    rng = np.random.default_rng(3)
    reqs = [(rng.integers(0, model.config.vocab_size, 6).tolist(), 5) for _ in range(5)]
    arrivals = [0.0, 0.0, 0.3, 0.35, 0.9]  # seconds on the fake clock, spread over the run
    clock = FakeClock(eng)
    t0 = clock.now + clock.tick  # the loop's first reading is its start
    events = []
    got = drive_online(eng, reqs, arrivals, clock=clock, sleep=clock.sleep, events=events)
    added = [(e[1], e[2]) for e in events if e[0] == "add"]  # (request index, fake time it was added)
    assert [i for i, _ in added] == list(range(len(reqs)))  # every request once, in arrival order
    for i, at in added:
        assert at >= t0 + arrivals[i]  # never added before its arrival on the fake clock
    # it waits for the next arrival only when idle
    assert clock.slept and not any(busy for _, busy in clock.slept)
    assert got["online_ttft_ms_p50"] > 0 and got["online_tpot_ms_p50"] > 0
    assert got["online_tok_s"] == pytest.approx(25 / (clock.now - t0))  # output tokens / loop wall
    assert not eng.has_unfinished()
    # one short request, then a long pause before the next one: the idle engine sleeps through it, to the arrival
    clock.slept.clear()
    events.clear()
    start = clock.now + clock.tick
    drive_online(eng, reqs[:2], [0.0, 2.0], clock=clock, sleep=clock.sleep, events=events)
    assert clock.slept and sum(d for d, _ in clock.slept) > 0.5 and not any(busy for _, busy in clock.slept)
    last_add = [e for e in events if e[0] == "add"][-1]
    assert last_add[1] == 1 and start + 2.0 <= last_add[2] <= start + 2.0 + 3 * clock.tick  # slept to the arrival


def test_help_lists_the_online_flags():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--help"], capture_output=True,
                       text=True, check=False, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--arrival-rate", "--decode-steps", "--fixed-lengths", "--unfused-row", "--trace-dir"):
        assert flag in r.stdout
