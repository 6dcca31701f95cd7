"""Serving an engine a synthetic workload: seeded request sets, Poisson arrivals, the offline driver (everything
queued at once, optionally a timed or traced window of its steps), the online open-loop driver (each request added
when it arrives, the idle loop sleeping until the next arrival), and latency percentiles.

A workload is a list of (prompt token ids, output length) pairs; EOS is ignored, so each request runs its full
output length. The online loop reads time from an injectable clock and waits with an injectable sleep, so a test
can drive it on a fake clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

import jkv

Workload = list[tuple[list[int], int]]


def workload(n: int, seed: int, max_len: int, vocab: int) -> Workload:
    """(prompt ids, output length) pairs: log-normal lengths, median 128 each, prompts <= max_len/4 and outputs
    <= max_len/2, so a static batch (longest prompt + longest output) always fits the context."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(np.clip(rng.lognormal(math.log(128), 0.8), 8, max_len // 4))
        o = int(np.clip(rng.lognormal(math.log(128), 0.8), 8, max_len // 2))
        out.append((rng.integers(0, vocab, p).tolist(), o))
    return out


def fixed_workload(n: int, prompt_len: int, output_len: int, vocab: int, seed: int = 0) -> Workload:
    """n requests of the same prompt and output length (few step shapes, one full batch), random prompts."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, prompt_len).tolist(), output_len) for _ in range(n)]


def poisson_arrivals(n: int, rate: float, seed: int = 1) -> list[float]:
    """Arrival offsets (s) of n requests at `rate` per second, exponential gaps, seeded."""
    return np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n)).tolist()


def _add(eng: jkv.Engine, prompt: list[int], out_len: int) -> str:
    return eng.add_request(prompt, jkv.SamplingParams(max_tokens=out_len, ignore_eos=True))


class Drive(NamedTuple):
    """One offline run: wall seconds, per engine step its wall seconds, decode rows and decode steps, the final
    outputs by request id, and the window's wall seconds (None without a window)."""

    wall: float
    step_times: list[float]
    decode_rows: list[int]
    decode_steps: list[int]
    final: dict
    window_wall: float | None


def drive(
    eng: jkv.Engine, reqs: Workload, window: tuple[int, int] | None = None, trace: str | None = None
) -> Drive:
    """Run the workload to the end, every request queued at the start. `window=(first, last)`: the device is
    settled (idle) before engine step `first` and after step `last - 1`, and the wall time between is returned
    (with `trace`, a jax.profiler trace of exactly that stretch goes there)."""
    import jax

    for prompt, out_len in reqs:
        _add(eng, prompt, out_len)
    step_times, decode_rows, decode_steps, final = [], [], [], {}
    t0 = time.perf_counter()
    i, w0, window_wall = 0, 0.0, None
    while eng.has_unfinished():
        if window and i == window[0]:
            eng.synchronize()  # the window starts on an idle device and holds whole steps
            if trace:
                jax.profiler.start_trace(trace)
            w0 = time.perf_counter()
        s0 = time.perf_counter()
        for out in eng.step(finished_only=True):
            if out.finished:
                final[out.request_id] = out
        step_times.append(time.perf_counter() - s0)
        decode_rows.append(eng.last_decode_rows)
        decode_steps.append(eng.last_decode_steps)
        i += 1
        if window and i == window[1]:
            eng.synchronize()
            window_wall = time.perf_counter() - w0
            if trace:
                jax.profiler.stop_trace()
    wall = time.perf_counter() - t0
    return Drive(wall, step_times, decode_rows, decode_steps, final, window_wall)


def run_to_end(eng: jkv.Engine, reqs: Workload, finished_only: bool = True) -> int:
    """Queue the workload and step (`step(finished_only=...)`) until it is done, nothing else in the loop (for
    profiling the engine's own host work); returns the number of engine steps."""
    for prompt, out_len in reqs:
        _add(eng, prompt, out_len)
    steps = 0
    while eng.has_unfinished():
        eng.step(finished_only=finished_only)
        steps += 1
    return steps


def drive_online(eng: jkv.Engine, reqs: Workload, arrivals: list[float], *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 events: list | None = None) -> dict:  # fmt: skip
    """Serve `reqs` as they arrive: request i is added once `arrivals[i]` seconds have passed on `clock` since the
    start (an open loop: late adds do not delay later arrivals); while the engine has nothing to do, the loop
    sleeps until the next arrival. Returns tok/s over the loop's wall time, the step compilations made inside, and
    latency percentiles counted from each request's scheduled arrival: the engine's own time from add_request to
    the first token plus how late the add came, so a host busy in `step()` when a request was due shows up in
    its time to first token.

    `clock` and `sleep` are the loop's time (time.monotonic and time.sleep; a test passes a fake pair). With
    `events` a list, ("add", i, clock time) and ("sleep", seconds) are appended as they happen.
    """
    t0 = clock()
    due = [t0 + a for a in arrivals]
    final, nxt, compiled = {}, 0, eng.stats().compilations
    late: dict[str, float] = {}  # request id -> seconds its add came after its arrival
    while nxt < len(reqs) or eng.has_unfinished():
        now = clock()
        while nxt < len(reqs) and due[nxt] <= now:
            at = clock()
            late[_add(eng, *reqs[nxt])] = at - due[nxt]
            if events is not None:
                events.append(("add", nxt, at))
            nxt += 1
        if not eng.has_unfinished():
            wait = max(0.0, due[nxt] - clock())
            if events is not None:
                events.append(("sleep", wait))
            sleep(wait)
            continue
        for out in eng.step(finished_only=True):
            if out.finished:
                final[out.request_id] = out
    wall = clock() - t0
    return {"online_tok_s": sum(o for _, o in reqs) / wall,
            "online_compiles_during_run": eng.stats().compilations - compiled,
            **{f"online_{k}": v for k, v in latency_stats(final, late).items()}}  # fmt: skip


def latency_stats(final: dict, late: dict[str, float] | None = None) -> dict:
    """Percentiles (ms) of time to first token and of mean time per output token over finished requests.
    Time to first token counts from `add_request`, plus `late[request_id]` when given (online: how long after its
    scheduled arrival the request was added); an offline batch queues every request at the start, so its times
    include queueing."""
    ms = lambda vals, q: 1e3 * float(np.percentile([v for v in vals if v is not None], q))  # noqa: E731
    late = late or {}
    ttft = [None if o.metrics.time_to_first_token is None else o.metrics.time_to_first_token + late.get(rid, 0.0)
            for rid, o in final.items()]  # fmt: skip
    tpot = [o.metrics.time_per_output_token for o in final.values()]
    return {"ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99), "tpot_ms_p50": ms(tpot, 50),
            "tpot_ms_p90": ms(tpot, 90), "tpot_ms_p99": ms(tpot, 99)}  # fmt: skip


def write_word_tokenizer(directory, vocab_size: int):
    """A tokenizer.json of `vocab_size` words w0, w1, ... (one word a token id, joined by spaces) in `directory`:
    text for every id of a model that ships no tokenizer (a random-weight preset), so a server can stream it."""
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be at least 1.")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path
