"""`jkv serve`'s Prometheus metrics (`jkv:` prefix, in vLLM's spirit), on a registry of their own.

Gauges mirror the engine's state (queues, blocks, KV usage, fragmentation, device memory beside the plan's
terms); counters follow the engine's cumulative counts (prefix-cache queries and hits in tokens, preemptions by
kind, swap bytes, generated tokens) by adding what changed since the last refresh; histograms take one
observation per request (time to first token, end-to-end latency, queue time) or per round that brings a request
tokens (inter-token latency: a multi-step round's tokens land together; the observation is the round's gap divided
by its tokens).

The engine loop owns them: its thread writes them, and with the engine in its own process so does that
process's pipe reader (the front ends' refusals); prometheus_client's metrics are thread-safe.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REFRESH_S = 0.05  # gauges follow the engine at most this often while it steps (and always once it is idle)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)  # fmt: skip


class ServerMetrics:
    def __init__(self, plan_terms: dict[str, int], model_name: str) -> None:
        r = self.registry = CollectorRegistry()
        g = lambda name, doc, labels=(): Gauge(f"jkv:{name}", doc, labels, registry=r)  # noqa: E731
        c = lambda name, doc, labels=(): Counter(f"jkv:{name}", doc, labels, registry=r)  # noqa: E731
        h = lambda name, doc: Histogram(f"jkv:{name}", doc, buckets=_LATENCY_BUCKETS, registry=r)  # noqa: E731
        self.running = g("num_requests_running", "Requests admitted and not finished.")
        self.waiting = g("num_requests_waiting", "Requests handed to the engine and not admitted yet.")
        self.swapped = g("num_requests_swapped", "Requests whose KV blocks are swapped out to host memory.")
        self.kv_usage = g("kv_cache_usage_perc", "Fraction of usable KV blocks in use (0..1).")
        self.blocks = g("kv_blocks", "KV blocks by state (free blocks include the cached ones).", ("state",))
        self.fragmentation = g("kv_internal_fragmentation", "Allocated KV slots holding no token / allocated slots.")
        self.plan_bytes = g("plan_bytes", "The memory plan's bytes per term.", ("term",))
        self.device_bytes = g("device_bytes_in_use", "Bytes the device reports in use (JAX memory_stats).")
        self.prefix_queries = c("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = c("prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self.preemptions = c("num_preemptions", "Requests preempted, by kind.", ("kind",))
        self.swap_bytes = c("swap_bytes", "Bytes moved between device and host by swapping.")
        self.prompt_tokens = c("prompt_tokens", "Prompt tokens of accepted requests.")
        self.generation_tokens = c("generation_tokens", "Tokens the engine generated.")
        self.compilations = c("xla_compilations", "XLA compilations the engine's calls caused (warm-up included; "
                              "none while serving after a complete warm-up).")  # fmt: skip
        self.finished = c("request_finished", "Requests finished, by finish reason.", ("reason",))
        self.rejected = c("request_rejected", "Requests refused, by HTTP status.", ("status",))
        self.api_server_requests = c("api_server_requests", "Requests handed to the engine, by API-server process "
                                     "(jkv serve --api-servers; engine in its own process).", ("api_server",))  # fmt: skip
        self.ttft = h("time_to_first_token_seconds", "Arrival at the server to the first token handed to the stream.")
        self.itl = h("inter_token_latency_seconds",
                     "Gap between tokens handed to a stream (one observation per round: its gap / its tokens).")
        self.e2e = h("e2e_request_latency_seconds", "Arrival at the server to the finish.")
        self.queue_time = h("request_queue_time_seconds", "Arrival in the engine to the first admission.")
        info = g("model_info", "The model served (value 1).", ("model",))
        info.labels(model=model_name).set(1)
        for term, value in plan_terms.items():
            self.plan_bytes.labels(term=term).set(value)
        self._last: dict[str, int] = {}
        self._last_refresh = 0.0

    def _add(self, counter, key: str, total: int) -> None:
        """Advance `counter` to the engine's cumulative `total`."""
        delta = total - self._last.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._last[key] = total

    def refresh(self, engine, num_waiting: int, num_active: int, *, force: bool = False) -> None:
        """Follow the engine's stats (engine thread only)."""
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_S:
            return
        self._last_refresh = now
        st = engine.stats()
        b = st.blocks
        self.waiting.set(num_waiting)
        self.swapped.set(st.swapped)
        self.running.set(max(0, num_active - num_waiting - st.swapped))
        self.kv_usage.set(st.blocks_used / st.blocks_total if st.blocks_total else 0.0)
        self.blocks.labels(state="used").set(st.blocks_used)
        self.blocks.labels(state="free").set(st.blocks_free)
        self.blocks.labels(state="cached").set(st.blocks_cached)
        self.blocks.labels(state="total").set(st.blocks_total)
        self.fragmentation.set(st.internal_fragmentation)
        self._add(self.prefix_queries, "pq", b.prefix_query_tokens)
        self._add(self.prefix_hits, "ph", b.prefix_hit_tokens)
        self._add(self.preemptions.labels(kind="recompute"), "pr", st.preemptions_recompute)
        self._add(self.preemptions.labels(kind="swap"), "ps", st.preemptions_swap)
        self._add(self.swap_bytes, "sb", st.swap_bytes)
        self._add(self.generation_tokens, "gt", st.tokens_generated)
        self._add(self.compilations, "xc", st.compilations)
        in_use = device_bytes_in_use()
        if in_use is not None:
            self.device_bytes.set(in_use)


def device_bytes_in_use() -> int | None:
    """The first device's bytes in use, where JAX reports it (GPUs; None on the CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use")


def plan_terms(engine, param_bytes: int) -> dict[str, int]:
    """The plan's bytes per term (parameters, KV pool, activation workspace, runtime reserve); without a plan
    (num_blocks given, or off the GPU) the terms the engine knows: its parameters and its pool."""
    plan = engine.plan
    if plan is not None:
        terms = {"parameters": "param_bytes", "kv_pool": "kv_pool_bytes", "activation": "activation_bytes",
                 "reserve": "reserve_bytes", "peak": "peak_bytes"}  # fmt: skip
        return {t: int(getattr(plan, a)) for t, a in terms.items() if getattr(plan, a, None) is not None}
    return {"parameters": param_bytes, "kv_pool": engine.manager.num_blocks * engine.bytes_per_block}
