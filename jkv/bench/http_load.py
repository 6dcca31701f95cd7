"""A load generator for `jkv serve` over real HTTP: streaming completion requests sent at Poisson arrivals (an
open loop) or by a fixed number of concurrent clients (a closed loop), each timed at the client, and the
summary a serving benchmark reports (TTFT / TPOT / ITL percentiles, throughput, goodput under an SLO).

Per request: TTFT is send -> the first streamed chunk; ITL the gaps between its chunks (a multi-step round's
tokens arrive in one chunk, so a gap covers all of them); TPOT (end - first chunk) / (tokens - 1). Every phase
has a deadline: requests still open then are cancelled and counted as failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # not at run time: a client process imports neither jkv's engine nor JAX
    from jkv.bench.serving import Workload


@dataclass
class Timing:
    """One request as the client saw it (seconds on the client's monotonic clock)."""

    sent: float
    first: float | None = None
    end: float | None = None
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: bool = False
    error: str | None = None


async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int, timing: Timing,
                      headers: dict | None = None) -> None:  # fmt: skip
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                timing.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                now = time.monotonic()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    timing.tokens = chunk["usage"]["completion_tokens"]
                    continue
                if timing.first is None:
                    timing.first = now
                timing.chunks.append(now)
        timing.end = time.monotonic()
        timing.ok = timing.first is not None and timing.tokens == max_tokens
    except Exception as err:  # a broken connection counts as a failed request
        timing.error = f"{type(err).__name__}: {err}"


async def run_load(url: str, model: str, reqs: Workload, *, arrivals: list[float] | None = None,
                   concurrency: int | None = None, deadline_s: float = 300.0, start_at: float | None = None,
                   api_key: str | None = None) -> tuple[list[Timing], float]:  # fmt: skip
    """Send `reqs` at `arrivals` offsets (open loop) or `concurrency` at a time (closed loop); returns each
    request's timing and the phase's wall seconds (first send to last finish). start_at: the phase's start on
    the host's monotonic clock (several processes share one; default: now). api_key: sent as a Bearer token."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timings = [Timing(0.0) for _ in reqs]
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s), limits=limits) as client:
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic() if start_at is None else start_at

        async def send(i: int, delay: float) -> None:
            if delay > 0:
                await asyncio.sleep(delay)
            timings[i].sent = time.monotonic()
            await one_request(client, url, model, reqs[i][0], reqs[i][1], timings[i], headers)

        if arrivals is not None:
            tasks = [asyncio.ensure_future(send(i, t0 + a - time.monotonic())) for i, a in enumerate(arrivals)]
        else:
            queue = list(range(len(reqs)))[::-1]

            async def worker() -> None:
                while queue:
                    await send(queue.pop(), 0.0)

            tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency or 1)]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = max((t.end for t in timings if t.end is not None), default=time.monotonic()) - t0
    for t in timings:
        if not t.ok and t.error is None:
            t.error = "unfinished at the phase deadline"
    return timings, wall


START_DELAY_S = 3.0  # run_load_in_processes: time for every client process to start before the phase's start


def split_load(n: int, processes: int, arrivals: list[float] | None,
               concurrency: int | None) -> list[tuple[list[int], list[float] | None, int | None]]:  # fmt: skip
    """The load's share of each of `processes` clients: (request indices, their arrival offsets, concurrency).
    Requests go round-robin; a closed loop's clients are spread as evenly as they go (none gets zero); an
    open loop keeps every request's own arrival, so together the shares send exactly the schedule."""
    processes = max(1, min(processes, n, concurrency or n))
    shares = []
    for k in range(processes):
        idx = list(range(k, n, processes))
        share_c = None if concurrency is None else concurrency // processes + (k < concurrency % processes)
        shares.append((idx, None if arrivals is None else [arrivals[i] for i in idx], share_c))
    return shares


def _load_share(url: str, model: str, reqs: Workload, arrivals, concurrency, deadline_s: float, start_at: float,
                api_key: str | None) -> tuple[list[Timing], float]:  # fmt: skip
    return asyncio.run(run_load(url, model, reqs, arrivals=arrivals, concurrency=concurrency, deadline_s=deadline_s,
                                start_at=start_at, api_key=api_key))  # fmt: skip


def run_load_in_processes(url: str, model: str, reqs: Workload, *, arrivals: list[float] | None = None,
                          concurrency: int | None = None, deadline_s: float = 300.0, processes: int = 1,
                          api_key: str | None = None) -> tuple[list[Timing], float]:  # fmt: skip
    """`run_load` spread over `processes` client processes (one Python client's parsing of every streamed chunk
    must not be what limits a fast server): the same requests, arrivals and total concurrency, one shared start
    on the host's monotonic clock; timings in request order and the phase's wall seconds (start to last finish)."""
    if processes <= 1:
        return asyncio.run(run_load(url, model, reqs, arrivals=arrivals, concurrency=concurrency,
                                    deadline_s=deadline_s, api_key=api_key))  # fmt: skip
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = split_load(len(reqs), processes, arrivals, concurrency)
    start_at = time.monotonic() + START_DELAY_S
    with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_load_share, url, model, [reqs[i] for i in idx], arr, c, deadline_s, start_at, api_key)
                   for idx, arr, c in shares]  # fmt: skip
        results = [f.result() for f in futures]
    timings: list[Timing] = [Timing(0.0)] * len(reqs)
    for (idx, _, _), (share, _) in zip(shares, results, strict=True):
        for i, t in zip(idx, share, strict=True):
            timings[i] = t
    wall = max((t.end for t in timings if t.end is not None), default=time.monotonic()) - start_at
    return timings, wall


def summarize(timings: list[Timing], wall: float, *, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """Percentiles (ms) of TTFT, TPOT and ITL over finished requests; output tok/s; requests/s; goodput (the
    requests/s that met both SLOs)."""
    ok = [t for t in timings if t.ok]
    ttft = [t.first - t.sent for t in ok]
    tpot = [(t.end - t.first) / (t.tokens - 1) for t in ok if t.tokens > 1]
    itl = [b - a for t in ok for a, b in zip(t.chunks, t.chunks[1:])]
    good = sum(1 for t in ok if t.first - t.sent <= slo_ttft_s
               and (t.tokens <= 1 or (t.end - t.first) / (t.tokens - 1) <= slo_tpot_s))  # fmt: skip
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    out = {"requests": len(timings), "failed": len(timings) - len(ok), "wall_s": wall,
           "output_tok_s": sum(t.tokens for t in ok) / wall if wall > 0 else 0.0,
           "req_s": len(ok) / wall if wall > 0 else 0.0, "goodput_req_s": good / wall if wall > 0 else 0.0}  # fmt: skip
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 90, 99):
            out[f"{name}_ms_p{q}"] = pct(xs, q)
    errors = [t.error for t in timings if t.error]
    if errors:
        out["first_error"] = errors[0]
    return out
