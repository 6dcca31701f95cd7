"""jkv.bench.http_load's split of one load over several client processes: every request exactly once, each with its
own arrival, the closed loop's clients all kept. (Against a real server: tests/test_serve.py.)"""

from __future__ import annotations

import random

import pytest

from jkv.bench.http_load import split_load


@pytest.mark.parametrize("n,processes,concurrency", [(10, 3, None), (10, 3, 7), (5, 8, None), (9, 4, 2), (1, 1, 1)])
def test_split_load_keeps_every_request_arrival_and_client(n, processes, concurrency):
    rng = random.Random(n * 31 + processes)
    arrivals = None if concurrency else sorted(rng.uniform(0, 5) for _ in range(n))
    shares = split_load(n, processes, arrivals, concurrency)
    assert 1 <= len(shares) <= min(processes, n, concurrency or n)
    assert sorted(i for idx, _, _ in shares for i in idx) == list(range(n))
    for idx, arr, c in shares:
        assert idx
        if arrivals is None:
            assert arr is None and c >= 1
        else:
            assert arr == [arrivals[i] for i in idx] and c is None
    if concurrency:
        assert sum(c for _, _, c in shares) == concurrency
