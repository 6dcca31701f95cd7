#!/usr/bin/env python
"""The HTTP side of `jkv serve` alone: its real app and engine loop over an engine stand-in that does no device
work, streamed to the load generator's httpx clients over real HTTP. It shows what the server's front end costs per
chunk and per token on this host's CPU, with no GPU, so changes to it can be compared before a GPU run.

The stand-in (`SyntheticEngine`) runs up to --max-num-seqs requests at once and gives each `--decode-steps` tokens
per step, as a multi-step engine round does, with text (one short word a token) so every chunk carries text as it
does when serving. It never sleeps: the served rate is what the front end sustains while the engine thread costs
almost nothing. Its offline rate (the same loop stepped without HTTP) is printed beside it.

    python scripts/bench_serve_frontend.py [--requests 256] [--output-len 128] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from scripts.bench_serve_frontend import serve_synthetic
serve_synthetic(**json.loads(sys.argv[2]))
"""


class SyntheticEngine:
    """What `EngineLoop` calls on an engine, with no model: every running request gains `steps` tokens a step."""

    def __init__(self, max_num_seqs: int, steps: int, round_s: float = 0.0, busy_s_per_token: float = 0.0) -> None:
        """round_s: a step lasts at least this long, sleeping (the GIL released, as while the device runs);
        busy_s_per_token: the engine thread's own Python work, spun with the GIL held, per token it reports."""
        self.max_num_seqs, self.steps = max_num_seqs, steps
        self.round_s, self.busy_s_per_token = round_s, busy_s_per_token
        self._last_step = time.monotonic()
        self.requests: dict[str, dict] = {}
        self.order: list[str] = []
        self.step_count = 0
        self.generated = 0

    def add_request(self, ids, sampling, request_id: str) -> str:
        if not ids:
            raise ValueError("the prompt is empty: send at least one token.")
        self.requests[request_id] = {"prompt": list(ids), "tokens": [], "text": "", "max": sampling.max_tokens,
                                     "arrival": time.monotonic(), "scheduled": None, "first": None}  # fmt: skip
        self.order.append(request_id)
        return request_id

    def abort(self, request_id: str) -> None:
        if request_id in self.requests:
            self.requests[request_id]["max"] = -1

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self):
        from jkv.request import RequestMetrics, RequestOutput, SampleOutput

        now = time.monotonic()
        outs = []
        for rid in list(self.order[: self.max_num_seqs]):
            r = self.requests[rid]
            aborted = r["max"] < 0
            new = [] if aborted else [(len(r["tokens"]) + k) % 50000 for k in range(min(self.steps, r["max"] - len(r["tokens"])))]
            r["tokens"] += new
            r["text"] += "".join(f" w{t % 1000}" for t in new)
            self.generated += len(new)
            r["scheduled"] = r["scheduled"] or now
            r["first"] = r["first"] or now
            done = aborted or len(r["tokens"]) >= r["max"]
            reason = "abort" if aborted else ("length" if done else None)
            metrics = RequestMetrics(r["arrival"], r["first"], now if done else None, len(r["tokens"]), r["scheduled"])
            sample = SampleOutput(list(r["tokens"]), r["text"], reason)
            outs.append(RequestOutput(rid, r["prompt"], list(r["tokens"]), new, r["text"], done, reason, [sample],
                                      metrics=metrics))
            if done:
                del self.requests[rid]
                self.order.remove(rid)
        self.step_count += 1
        busy_until = time.perf_counter() + self.busy_s_per_token * sum(len(o.new_token_ids) for o in outs)
        while time.perf_counter() < busy_until:
            pass
        left = self._last_step + self.round_s - time.monotonic()
        if left > 0:
            time.sleep(left)
        self._last_step = time.monotonic()
        return outs

    def stats(self):
        from types import SimpleNamespace

        blocks = SimpleNamespace(prefix_query_tokens=0, prefix_hit_tokens=0)
        return SimpleNamespace(blocks=blocks, swapped=0, blocks_used=len(self.requests), blocks_total=1024,
                               blocks_free=1024 - len(self.requests), blocks_cached=0, internal_fragmentation=0.0,
                               preemptions_recompute=0, preemptions_swap=0, swap_bytes=0,
                               tokens_generated=self.generated, compilations=0)  # fmt: skip


class WordTokenizer:
    """Enough of a tokenizer for the app: prompts are token ids in this benchmark."""

    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()] or [0]

    def decode(self, ids) -> str:
        return "".join(f" w{t % 1000}" for t in ids)


def build_synthetic(args):
    """(engine, metrics) for an engine process (jkv.serve.engine_process's `build` hook): a SyntheticEngine."""
    from jkv.serve.metrics import ServerMetrics

    engine = SyntheticEngine(args.max_num_seqs, args.steps, args.round_s, args.busy_s_per_token)
    engine.tokenizer, engine.max_seq_len, engine.config = WordTokenizer(), 100_000, SimpleNamespace(vocab_size=50_000)
    engine.close = lambda: None
    return engine, ServerMetrics({"parameters": 0, "kv_pool": 0}, "synthetic")


def serve_synthetic(port: int, max_num_seqs: int, steps: int, round_s: float, busy_s_per_token: float,
                    engine_process: bool = False) -> None:  # fmt: skip
    """The real `jkv serve` app and engine loop over a SyntheticEngine, on 127.0.0.1:port (a child process);
    engine_process: the engine loop in a process of its own, as `jkv serve --engine-process` runs it."""
    import uvicorn

    from jkv.serve.app import ServerState, create_app
    from jkv.serve.engine_loop import EngineLoop
    from jkv.serve.engine_process import EngineProcess

    knobs = SimpleNamespace(max_num_seqs=max_num_seqs, steps=steps, round_s=round_s, busy_s_per_token=busy_s_per_token,
                            log_level="warning", no_warmup=True)  # fmt: skip
    if engine_process:
        knobs.max_waiting = 100_000
        loop = EngineProcess.spawn(knobs, max_waiting=100_000, build="scripts.bench_serve_frontend:build_synthetic")
    else:
        engine, metrics = build_synthetic(knobs)
        loop = EngineLoop(engine, metrics, max_waiting=100_000)
    state = ServerState(loop, WordTokenizer(), "synthetic", 100_000, 50_000)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            loop.start()
            for _ in range(1000):  # the engine process says when it serves
                if loop.ready:
                    break
                await asyncio.sleep(0.01)
            print("ready", flush=True)

    try:
        Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")).run()
    finally:
        loop.stop()


def offline_rate(requests: int, output_len: int, max_num_seqs: int, steps: int, round_s: float,
                 busy_s_per_token: float) -> float:  # fmt: skip
    """Tokens per second of the stand-in stepped directly, every output read (the engine thread alone)."""
    from jkv.sampling import SamplingParams

    eng = SyntheticEngine(max_num_seqs, steps, round_s, busy_s_per_token)
    sp = SamplingParams(max_tokens=output_len, ignore_eos=True)
    for i in range(requests):
        eng.add_request([1, 2, 3], sp, request_id=str(i))
    t0 = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    return eng.generated / (time.perf_counter() - t0)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--round-ms", type=float, default=8.5,
                    help="a step lasts at least this long (8.5 ms: gpt2's 60k tok/s at 64 rows x 8 steps on an H200)")
    ap.add_argument("--engine-us-per-token", type=float, default=0.0,
                    help="the engine thread's own Python work per token, GIL held")
    ap.add_argument("--client-processes", type=int, default=1)
    ap.add_argument("--engine-process", action="store_true", help="the engine loop in its own process")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    from jkv.bench.http_load import run_load_in_processes, summarize

    knobs = {"max_num_seqs": args.concurrency, "steps": args.decode_steps, "round_s": args.round_ms / 1e3,
             "busy_s_per_token": args.engine_us_per_token / 1e6}  # fmt: skip
    server = {"port": args.port, "engine_process": args.engine_process, **knobs}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT), json.dumps(server)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))  # fmt: skip
    try:
        for _ in range(20):  # the engine process prints its own lines too
            line = proc.stdout.readline()
            if not line or line.strip() == "ready":
                break
        if line.strip() != "ready":
            raise SystemExit("bench_serve_frontend: the server did not start")
        reqs = [([1, 2, 3, 4], args.output_len) for _ in range(args.requests)]
        url = f"http://127.0.0.1:{args.port}"
        load = dict(concurrency=args.concurrency, deadline_s=args.timeout, processes=args.client_processes)
        run_load_in_processes(url, "synthetic", reqs[: args.concurrency], **load)  # warm-up
        cpu0 = _cpu_seconds(proc.pid)
        timings, wall = run_load_in_processes(url, "synthetic", reqs, **load)
        server_cpu = _cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(30)
    s = summarize(timings, wall, slo_ttft_s=10.0, slo_tpot_s=1.0)
    chunks = sum(len(t.chunks) for t in timings if t.ok)
    tokens = sum(t.tokens for t in timings if t.ok)
    off = offline_rate(args.requests, args.output_len, **knobs)
    print(json.dumps({"served_tok_s": round(s["output_tok_s"]), "offline_tok_s": round(off), "chunks": chunks,
                      "tokens_per_chunk": round(tokens / max(chunks, 1), 2), "failed": s["failed"],
                      "first_error": s.get("first_error"), "wall_s": round(wall, 2),
                      "server_cpu_share": round(server_cpu / wall, 2),
                      "server_cpu_us_per_chunk": round(1e6 * server_cpu / max(chunks, 1), 1),
                      "ttft_ms_p50": round(s["ttft_ms_p50"], 1)}))  # fmt: skip

if __name__ == "__main__":
    main()
