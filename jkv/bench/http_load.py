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

import numpy as np

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


async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int, timing: Timing) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
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
                   concurrency: int | None = None, deadline_s: float = 300.0) -> tuple[list[Timing], float]:  # fmt: skip
    """Send `reqs` at `arrivals` offsets (open loop) or `concurrency` at a time (closed loop); returns each
    request's timing and the phase's wall seconds (first send to last finish)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timings = [Timing(0.0) for _ in reqs]
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s), limits=limits) as client:
        t0 = time.monotonic()

        async def send(i: int, delay: float) -> None:
            if delay > 0:
                await asyncio.sleep(delay)
            timings[i].sent = time.monotonic()
            await one_request(client, url, model, reqs[i][0], reqs[i][1], timings[i])

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
