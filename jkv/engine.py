"""The paged serving engine: `Engine` (add_request / step / abort / stream / stats) and `generate`.

One engine step = one scheduling round (jkv.scheduler), the device copies it implies (swap-out, swap-in,
copy-on-write), at most one decode step and one prefill step on the device (jkv.runner), then sampling
bookkeeping on the host: finished sequences give their blocks back, `n > 1` requests fork after their prompt,
beam search picks its beams. The K/V pools are allocated once (sized by the planner unless `num_blocks` is given)
and only ever updated in place.

Async scheduling (the default) overlaps the host's work with the device's: a step is dispatched before the
previous step's sampled tokens are read, and the reading and bookkeeping of those tokens run while the device
computes. See `Engine` and docs/engine.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jkv.block_manager import BlockManager
from jkv.kv_cache import KVPools, allocate_pools, copy_blocks, gather_blocks, scatter_blocks
from jkv.request import UNKNOWN_TOKEN, Request, RequestMetrics, RequestOutput, SampleOutput, Sequence, SeqStatus
from jkv.runner import StepRunner, bucket, build_inputs, pack
from jkv.sampling import SamplingParams, sample_tokens
from jkv.scheduler import Scheduler, SchedulerOutput
from planner.kv_layout import blocks_for_tokens, kv_dtype as planner_kv_dtype, kv_bytes_per_token
from planner.memory import PREFILL_MIN_CHUNK, padded_prefill_tokens

MIN_CHUNK = PREFILL_MIN_CHUNK  # smallest prefill chunk bucket
SWAP_STAGING_BYTES = 64 * 2**20  # most KV bytes one swap call gathers or scatters on the device
# `generate()`'s default multi-step decode: 16 steps per round kept the GPU < 2 % idle on the three hosts where it
# was measured (gpt2 batch 32), where 8 steps left 12-17 % idle on three slower hosts of five (docs/benchmarks.md).
GENERATE_DECODE_STEPS = 16


@dataclass
class EngineStats:
    """A snapshot of the engine: block use, sharing, fragmentation, preemption, swapping and throughput."""

    step: int
    blocks_total: int  # usable blocks (the null block excluded)
    blocks_used: int
    blocks_free: int
    blocks_cached: int  # free blocks still holding reusable prefix-cache content
    prefix_hit_rate: float
    internal_fragmentation: float  # allocated slots holding no token / allocated slots
    blocks_saved_by_sharing: int
    preemptions_recompute: int
    preemptions_swap: int
    swap_bytes: int  # host <-> device bytes moved by swapping
    running: int
    waiting: int
    swapped: int
    tokens_generated: int
    compilations: int
    history: list[dict] = field(default_factory=list, repr=False)


def _sample_many(logits_row, temperature, top_k, top_p, seeds, counters):
    n = seeds.shape[0]
    rows = jnp.broadcast_to(logits_row, (n, logits_row.shape[-1]))
    return sample_tokens(rows, temperature, top_k, top_p, seeds, counters)


_sample_many_jit = jax.jit(_sample_many)


@partial(jax.jit, static_argnums=2)
def _top_candidates(logits: jax.Array, cum: jax.Array, k: int):
    """Top-k (score, beam, token) over all beams' continuations: score = cum + log p."""
    logp = jax.nn.log_softmax(logits, axis=-1) + cum[:, None]  # [W, V]
    scores, flat = jax.lax.top_k(logp.reshape(-1), k)
    return scores, flat // logits.shape[-1], flat % logits.shape[-1]


def _mix_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919) & 0xFFFFFFFF


@dataclass
class _Part:
    """The rows of one device call (decode or prefill) that sampled tokens."""

    seqs: list[Sequence]
    idx: list[int]  # each row's place in the step's token buffer
    logits: jax.Array | None  # [B, V] on the device, row = idx - offset (None: the host needs no logits)
    offset: int
    decode: bool
    starts: list[int]  # per row: the index in seq.tokens its (first) sampled token belongs at
    steps: jax.Array | None = None  # multi-step decode: the sampled tokens [K, B]; row b's first counts[b]
    counts: list[int] | None = None  # multi-step decode: tokens each row samples


@dataclass
class _Flight:
    """A dispatched step: its token buffer on the device and the rows that sampled into it."""

    step: int
    tokens: jax.Array  # int32 [token_slots]: decode rows at [0, B), prefill rows from token_slots / 2
    parts: list[_Part]
    sync: bool  # read back within the same step() (synchronous mode, beams, forks)


class Engine:
    """A paged KV-cache engine over one model.

    Args:
        model: a `jkv.load_model(...)` result (or anything with `.config` and `.params`).
        num_blocks: KV blocks including the null block; None: from the planner, for `hbm` bytes (or, on a GPU,
            the device's memory) -- on a CPU without `hbm`, enough for max_num_seqs full-length sequences.
        block_size: tokens per block (a power of two).
        max_num_seqs: most sequences running at once (the decode batch cap).
        max_num_batched_tokens: prefill tokens per step (the chunk budget; decodes run beside it).
        max_seq_len: longest prompt + output (default: the model's positions).
        enable_prefix_caching, watermark: see BlockManager.
        preemption_mode: 'recompute' or 'swap'; swap_blocks: host blocks for swapping.
        attention: 'auto' (Pallas on GPU, jnp reference elsewhere), 'pallas', 'reference' or 'interpret'.
        kv_dtype: storage of the pools: 'bfloat16' (default: the model's dtype), 'float16', 'float32', 'int8',
            'float8_e4m3fn', 'int4' (quantized on write, dequantized inside the attention kernels).
        sliding_window: attend to the last W tokens only; blocks out of the window are freed.
        tokenizer: for `.text` in outputs (default: GPT-2's when the vocab matches).
        record_history: keep a per-step stats record (memory timeline).
        compile_cache_dir: keep compiled steps in JAX's persistent compilation cache there (process-wide setting),
            so a restarted server does not pay again for every bucketed step shape (measured: ~30 s of compiles
            in a 256-request GPT-2 run on an H200).
        async_scheduling: dispatch each step before reading the previous step's sampled tokens (below); False
            reads every step's tokens before `step()` returns.
        decode_steps: multi-step decode. The decode rows of a round without beam search run up to this many
            decode steps in one device call, each step's sampled tokens feeding the next on the device (a
            prefill chunk of the same round runs in a call of its own); the host schedules, reads back and does
            the bookkeeping once per round. 1 (the default) runs one decode step per `step()`. The tokens are
            the same either way (every token's sampling key is its request's seed and its index); what changes
            is that a `step()` may report several tokens per request, a request that finishes mid-round leaves
            its row idle until the round ends, and waiting requests are admitted at round boundaries only.
            Rounds that would need more free blocks than the pool has run a single step instead.

    Async scheduling. The scheduler needs lengths, not token values: a sequence whose token the device
    sampled but the host has not read gets its slot anyway (a placeholder id, `UNKNOWN_TOKEN`), and its decode
    row reads the token from the previous step's on-device token buffer (`src_rows`). So `step()` n schedules
    and dispatches step n, then reads step n-1's tokens (one device->host copy) and does their bookkeeping
    (tokens, stop checks, freed blocks, outputs) while the device runs step n. Consequences:
      - Outputs (and `stream()`) report a token one call later than the synchronous engine; the tokens, finish
        reasons and counts are the same. One more `step()` call at the end reads the last step.
      - A sequence stopped by a stop token at step n-1 was already scheduled into step n: that row's K/V write
        goes to a slot of its own (now freed) blocks and its token is dropped. Stopping by max_tokens is known
        in advance: such a sequence is never scheduled past its last token, and its blocks are freed as soon
        as its last token is dispatched.
      - A request preempted by recomputation while its token is in flight waits one round to be readmitted.
    Steps that need sampled tokens or logits on the host before the next schedule are read back synchronously,
    within the same `step()`: any step with a beam-search row, and a prefill that completes the prompt of an
    `n > 1` request (its samples fork from the first token's logits). Prefill chunks that complete an ordinary
    prompt, preemption by recomputation or swapping, prefix caching and sliding windows stay asynchronous.

    `events`: set it to a list to log ("dispatch", step) and ("read", step) as steps are launched and read.
    """

    def __init__(
        self,
        model,
        *,
        num_blocks: int | None = None,
        hbm: int | str | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_seq_len: int | None = None,
        enable_prefix_caching: bool = True,
        watermark: float = 0.01,
        preemption_mode: str = "recompute",
        swap_blocks: int = 0,
        attention: str = "auto",
        kv_dtype: str | None = None,
        sliding_window: int | None = None,
        tokenizer=None,
        record_history: bool = False,
        compile_cache_dir: str | None = None,
        async_scheduling: bool = True,
        decode_steps: int = 1,
    ) -> None:
        if compile_cache_dir is not None:
            jax.config.update("jax_compilation_cache_dir", str(compile_cache_dir))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        self.model = model
        config = model.config
        if sliding_window is not None:
            if not isinstance(sliding_window, int) or sliding_window < 1:
                raise ValueError(f"sliding_window={sliding_window!r} must be a positive integer.")
            config = config.replace(sliding_window=sliding_window)
        self.config = config
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two.")
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive.")
        if not isinstance(decode_steps, int) or decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps!r} must be a positive integer (1: one decode step per call).")
        self.decode_steps = decode_steps
        self.max_seq_len = max_seq_len or config.n_positions
        if not 1 <= self.max_seq_len <= config.n_positions:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be between 1 and {config.n_positions}.")
        dtype_name = jnp.dtype(model.params["wte"]["embedding"].dtype).name
        self.kv_dtype = kv_dtype or dtype_name
        planner_kv_dtype(self.kv_dtype)  # validates the name
        self.block_size = block_size
        self.plan = None
        if num_blocks is None:
            num_blocks = self._planned_blocks(hbm, dtype_name, max_num_seqs, max_num_batched_tokens)
        self.bytes_per_block = block_size * kv_bytes_per_token(config, planner_kv_dtype(self.kv_dtype))
        self.pools: KVPools = allocate_pools(config, num_blocks, block_size, self.kv_dtype)
        self.manager = BlockManager(
            num_blocks, block_size, enable_prefix_caching=enable_prefix_caching, watermark=watermark,
            num_swap_blocks=swap_blocks, sliding_window=sliding_window, bytes_per_block=self.bytes_per_block,
        )  # fmt: skip
        self.scheduler = Scheduler(
            self.manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            preemption_mode=preemption_mode,
            padded_size=self._prefill_positions,
            max_padded=padded_prefill_tokens(max_num_batched_tokens),
        )  # fmt: skip
        self.runner = StepRunner(model.params, config, block_size=block_size, backend=attention,
                                 sliding_window=sliding_window,
                                 token_slots=2 * bucket(max_num_seqs))  # fmt: skip
        self.runner.use_pools(self.pools)  # the backend is final from here on (step shapes depend on it)
        self.host_pools: KVPools | None = None  # swap space in host memory, laid out like the pools
        if swap_blocks:
            self.host_pools = jax.tree.map(lambda a: np.zeros((swap_blocks, *a.shape[1:]), a.dtype), self.pools)
        # blocks per swap call: a power of two, at most one longest sequence's blocks and SWAP_STAGING_BYTES
        self.swap_chunk = min(bucket(blocks_for_tokens(self.max_seq_len, block_size)),
                              1 << max(0, (SWAP_STAGING_BYTES // self.bytes_per_block).bit_length() - 1))  # fmt: skip
        self.tokenizer = tokenizer if tokenizer is not None else self._default_tokenizer()
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._step = 0
        self._tokens_generated = 0
        self.record_history = record_history
        self.history: list[dict] = []
        self._seq_ids = itertools.count(1)
        self.last_decode_rows = 0
        self.last_decode_steps = 0  # decode steps the last step() ran on the device (K in a multi-step round)
        self.async_scheduling = bool(async_scheduling)
        self._tokens = self.runner.zero_tokens()  # the last dispatched step's token buffer (on the device)
        self._flight: _Flight | None = None  # the dispatched step whose tokens are not read yet
        self.events: list[tuple[str, int]] | None = None  # a list: ("dispatch" | "read", step) logged there

    # Set-up helpers ---------------------------------------------------------------------------------------
    def _planned_blocks(self, hbm, dtype_name, max_num_seqs, max_tokens) -> int:
        from planner import PlanOptions, make_plan, parse_size

        if hbm is None and jax.default_backend() == "gpu":
            hbm = jax.devices()[0].memory_stats()["bytes_limit"]
        if hbm is None:
            per_seq = blocks_for_tokens(self.max_seq_len, self.block_size, self.config.sliding_window)
            return max_num_seqs * per_seq + 1
        self.plan = make_plan(
            self.config,
            PlanOptions(hbm_bytes=parse_size(hbm), dtype=dtype_name, kv_dtype=self.kv_dtype, block_size=self.block_size,
                        max_seq_len=self.max_seq_len, max_num_seqs=max_num_seqs, prefill_chunk=max_tokens),
        )  # fmt: skip
        return self.plan.layout.num_blocks

    def _default_tokenizer(self):
        if self.config.vocab_size != 50257:
            return None
        from jkv.tokenizer import get_tokenizer

        try:
            return get_tokenizer()
        except ValueError as err:  # the tokenizer files are missing: token ids still work, text does not
            import warnings

            warnings.warn(f"{err} Outputs will carry token ids only (text=None).", stacklevel=3)
            return None

    # Requests ---------------------------------------------------------------------------------------------
    def _check_request(self, prompt, sampling: SamplingParams) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as lists of token ids.")
            prompt = self.tokenizer.encode(prompt)
        ids = [int(t) for t in np.asarray(prompt).reshape(-1)] if len(prompt) else []
        if not ids:
            raise ValueError("the prompt is empty: give at least one token.")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"the prompt holds a token id outside [0, {self.config.vocab_size}).")
        total = len(ids) + sampling.max_tokens
        if total > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} exceeds the "
                f"{self.max_seq_len}-token context: shorten the prompt or lower max_tokens."
            )
        width = max(sampling.n, sampling.beam_width)
        per_seq = blocks_for_tokens(total, self.block_size, self.config.sliding_window)
        # forks share the prompt's blocks; each needs its own blocks for its output (+1 for a copied block)
        shared = len(ids) // self.block_size
        window = self.config.sliding_window
        if window is not None:  # shared prompt blocks behind the window are dropped: forks hold their own
            shared = min(shared, max(0, len(ids) - max(0, total - window)) // self.block_size)
        need = per_seq + (width - 1) * (per_seq - shared + 1)
        usable = self.manager.num_blocks - 1 - self.manager.watermark_blocks
        if need > usable:
            raise ValueError(
                f"this request needs up to {need} KV blocks but the pool has {usable}: it can never fit; lower "
                "max_tokens, n or beam_width, or give the engine more blocks."
            )
        if width > self.scheduler.max_num_seqs:
            raise ValueError(f"n / beam_width {width} exceeds max_num_seqs={self.scheduler.max_num_seqs}.")
        return ids

    def add_request(self, prompt: str | Seq[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None) -> str:  # fmt: skip
        """Queue a request; returns its id. Raises ValueError (and changes nothing) for bad input."""
        sampling = sampling or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests and not self.requests[request_id].finished:
            raise ValueError(f"request id {request_id!r} is already in use: pick another.")
        ids = self._check_request(prompt, sampling)
        req = Request(request_id, ids, sampling, next(self._arrivals))
        req.seqs.append(Sequence(self._new_seq_id(), req, list(ids), len(ids)))
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def _new_seq_id(self) -> int:
        return next(self._seq_ids)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(str(request_id))
        if req is None:
            raise ValueError(f"no request with id {request_id!r}: pass an id that add_request returned.")
        if not req.finished:
            for s in req.seqs:
                if s.status is not SeqStatus.FINISHED:
                    s.finish_reason = "aborted"
                    s.inflight = None  # a token still in flight is dropped
                    s.drop_placeholders()  # and so are the slots of a multi-step round in flight
            self.scheduler.remove(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or self._flight is not None

    def synchronize(self) -> None:
        """Block until nothing this engine launched is still running or copying on the device: the pools and
        the step in flight (async scheduling) with its tokens. Reads nothing back and changes no state; for
        timing and tracing windows that must start and end on an idle device."""
        arrays = [self.pools]
        if self._flight is not None:
            arrays += [self._flight.tokens, *(p.steps for p in self._flight.parts if p.steps is not None)]
        jax.block_until_ready(arrays)
        jax.effects_barrier()

    # The step ---------------------------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduling round and model step; returns the requests that produced tokens or finished.

        With async scheduling, the tokens a step samples are read (and reported) during the next call, after
        that call has dispatched its own step; see the class docstring. finished_only: report only the
        requests that finished (or failed) in this step, for callers that do not stream (`run()`, offline
        benchmarks): the others' outputs, a copy of every token so far per request and step, are not built.
        Their metrics are stamped all the same (a first token's time is the step that first reads it).
        """
        sched = self.scheduler.schedule()
        self._run_ops(sched)
        touched: dict[str, Request] = {r.request_id: r for r in sched.preempted}  # requests to report, by id
        self.last_decode_rows = len(sched.decode)
        self.last_decode_steps = 1 if sched.decode else 0
        prev, self._flight = self._flight, None
        flight = self._dispatch(sched)
        if prev is not None:
            self._land(prev, touched)
        if flight is not None:
            self._settle(flight)
            if flight.sync:
                self._land(flight, touched)
            else:
                self._flight = flight
                self._release_at_length(flight)
        for req in self.scheduler.rejected:  # requests the scheduler found can never be admitted
            touched[req.request_id] = req
        self.scheduler.rejected = []
        self._step += 1
        if self.record_history:
            self.history.append(self._snapshot())
        reqs = sorted(touched.values(), key=lambda r: r.arrival)
        if finished_only:
            for req in reqs:
                if not req.finished and req.first_token_time is None:
                    self._stamp(req, bool(req.seqs) and req.seqs[0].has_output(), False)
            return [self._output(req) for req in reqs if req.finished]
        return [self._output(req) for req in reqs]

    def _run_ops(self, sched: SchedulerOutput) -> None:
        for kind, arg in sched.ops:
            if kind == "cow":
                self._copy_blocks([s for s, _ in arg], [d for _, d in arg])
            elif kind == "swap_out":
                self._swap_out(list(arg.keys()), list(arg.values()))
            elif kind == "swap_in":
                self._swap_in(list(arg.keys()), list(arg.values()))
            else:  # pragma: no cover - internal
                raise AssertionError(kind)

    # Swapping moves blocks in calls of at most swap_chunk blocks, each padded to a power of two with the null
    # block (one compiled shape per bucket, which warmup() covers; a call's staging copy on the device stays
    # within SWAP_STAGING_BYTES, whatever a request holds).
    def _swap_pieces(self, n: int) -> Iterator[tuple[int, int, int]]:
        """(start, stop, padded size) of each swap call moving n blocks."""
        for start in range(0, n, self.swap_chunk):
            stop = min(n, start + self.swap_chunk)
            yield start, stop, bucket(stop - start)

    def _swap_out(self, dev: list[int], host: list[int]) -> None:
        """Copy device blocks `dev` to host blocks `host` (same order)."""
        leaves = jax.tree.leaves(self.host_pools)
        for start, stop, size in self._swap_pieces(len(dev)):
            ids = dev[start:stop] + [0] * (size - (stop - start))
            data = jax.device_get(gather_blocks(self.pools, jnp.asarray(ids, jnp.int32)))
            for h_arr, d_arr in zip(leaves, jax.tree.leaves(data)):
                h_arr[host[start:stop]] = d_arr[: stop - start]

    def _swap_in(self, host: list[int], dev: list[int]) -> None:
        """Copy host blocks `host` back to device blocks `dev` (same order); padding writes the null block."""
        for start, stop, size in self._swap_pieces(len(dev)):
            pad = size - (stop - start)
            idx = np.asarray(host[start:stop] + [host[start]] * pad)
            contents = jax.tree.map(lambda a, idx=idx: jnp.asarray(a[idx]), self.host_pools)
            ids = jnp.asarray(dev[start:stop] + [0] * pad, jnp.int32)
            self.pools = scatter_blocks(self.pools, ids, contents)

    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy-on-write copies, padded to a power of two with null-block-to-itself copies (one compiled shape
        per bucket, which warmup() covers)."""
        size = bucket(len(src))
        pad = [0] * (size - len(src))
        self.pools = copy_blocks(self.pools, jnp.asarray(src + pad, jnp.int32), jnp.asarray(dst + pad, jnp.int32))

    # Step shapes: the bucketing rules of _dispatch, shared with step_shapes() and warmup() --------------------
    def _rows_bucket(self, n: int) -> int:
        """Rows of a step over n sequences: the next power of two, at most max_num_seqs (the planner sized the
        step workspace for that many rows)."""
        return min(bucket(n), self.scheduler.max_num_seqs)

    def _width_bucket(self, tokens: int) -> int:
        """Block-table width of a step whose longest row holds `tokens` tokens: the next power of two of its
        blocks. The decode kernel splits its work by this width, so decode keeps it tight."""
        return bucket(-(-tokens // self.block_size))

    def _prefill_positions(self, rows: int, longest: int) -> int:
        """Query positions a prefill step of `rows` chunks, the longest `longest` tokens, computes after padding."""
        return self._rows_bucket(rows) * bucket(longest, MIN_CHUNK)

    def _prefill_width(self, tokens: int) -> int:
        """A prefill's block-table width. The Pallas prefill kernel loops only up to each row's own length, so a
        wider table adds no loop steps there (only a larger int32 table) and every prefill takes the longest
        sequence's width: one compiled shape per (rows, chunk) instead of one per width as well. The reference
        gathers the whole table: bucketed."""
        if self.runner.backend in ("pallas", "interpret"):
            return self._width_bucket(self.max_seq_len)
        return self._width_bucket(tokens)

    def step_shapes(self, greedy: bool | None = None) -> list[tuple[str, bool, tuple[int, int, int]]]:
        """Every model-step call this engine can make, as (kind, greedy, (rows, chunk, width)).

        kind: "decode" (one decode step), "steps" (a multi-step decode round of `decode_steps`, when it is > 1)
        or "prefill". greedy: None lists both the greedy and the sampling variant of each shape. The lists follow
        the rules `_dispatch` buckets with: rows a power of two up to max_num_seqs, widths powers of two up to the
        longest sequence's blocks, prefill chunks powers of two from MIN_CHUNK up to the step's token budget;
        a prefill (rows, chunk) pair is listed only when the token budget can fill it (one chunk long enough for
        the chunk bucket plus one token for each other row) and the scheduler allows its padded size.
        """
        modes = (True, False) if greedy is None else (bool(greedy),)
        max_seqs, budget = self.scheduler.max_num_seqs, self.scheduler.max_num_batched_tokens
        first_n = {}  # rows bucket -> the fewest sequences that make it
        for n in range(1, max_seqs + 1):
            first_n.setdefault(self._rows_bucket(n), n)
        widths = sorted({self._width_bucket(t) for t in range(1, self.max_seq_len + 1)})
        first_len = {}  # chunk bucket -> the shortest chunk that makes it
        for n in range(1, min(budget, self.max_seq_len) + 1):
            first_len.setdefault(bucket(n, MIN_CHUNK), n)
        prefill = [(b, c, w) for c, n_min in first_len.items() for b, k_min in first_n.items()
                   if n_min + (k_min - 1) <= budget and b * c <= self.scheduler.max_padded
                   for w in sorted({self._prefill_width(t) for t in range(n_min, self.max_seq_len + 1)})]  # fmt: skip
        shapes = []
        for g in modes:
            for b in first_n:
                for w in widths:
                    shapes.append(("decode", g, (b, 1, w)))
                    if self.decode_steps > 1:
                        shapes.append(("steps", g, (b, 1, w)))
            shapes += [("prefill", g, shape) for shape in prefill]
        return shapes

    def warmup(self, greedy: bool | None = None, threads: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:  # fmt: skip
        """Compile every step shape this engine can meet (`step_shapes`) before serving, so that no request
        waits while XLA compiles a new batch shape (seconds per shape on a GPU: an online stream meets new
        shapes for a long time, as arrivals vary the batch).

        Each shape runs once on padding rows only: they attend over nothing and write only the null block, so
        the pools' contents are untouched, and XLA compiles and autotunes the step exactly as a real one would.
        Copy-on-write copies are warmed for every bucket up to max_num_seqs, and with swap space
        (`swap_blocks`) the swap-out and swap-in calls for every bucket up to `swap_chunk` blocks. Shapes
        already compiled are skipped. greedy: None warms both the greedy and the sampling variants. With
        `compile_cache_dir` set, a later process loads the executables from disk instead.

        threads: compile this many shapes at a time first (default on a GPU: up to 8, one per CPU core; 1
        elsewhere); XLA compiles on the calling thread, so one thread per shape overlaps their compilations.
        The runs that follow find the executables compiled. A shape whose compilation fails in parallel (say,
        the GEMM autotuner found no free memory beside the others) compiles again alone in its run, as it
        would without threads.
        progress: called as progress(done, total) on the calling thread each time a shape is compiled (with
        threads, as each thread's compilation comes back, in the list's order), so a caller can show how far a
        warm-up of minutes has got.
        Returns {"shapes": steps compiled now, "seconds": wall time, "parallel_failures": that count}.
        """
        if self.has_unfinished():
            raise RuntimeError("warmup() runs on an idle engine: call it before adding requests or after they finish.")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads={threads!r} must be a positive integer (1: compile one shape at a time).")
        if progress is not None and not callable(progress):
            raise ValueError(f"progress={progress!r} must be a function of (done, total) or None.")
        report = progress or (lambda done, total: None)
        t0 = time.perf_counter()
        before = len(self.runner.compiled)
        r, buf = self.runner, self._tokens
        todo = []  # (inputs, how to call the runner: decode, greedy, num_steps) of each shape still to compile
        for kind, g, (b, c, w) in self.step_shapes(greedy):
            x = build_inputs([], block_size=self.block_size, chunk=c, width=w, batch=b)
            steps = self.decode_steps if kind == "steps" else None
            call = {"decode": kind != "prefill", "greedy": g, "num_steps": steps}
            if not r.is_compiled(x, **call):
                todo.append((x, call))
        if threads is None:  # XLA's CPU compiler already spreads one compilation over the cores
            threads = min(8, os.cpu_count() or 1) if jax.default_backend() == "gpu" else 1
        failures = 0
        if threads > 1 and len(todo) > 1:
            # the jitted functions are made here, on this thread; the threads only trace, lower and compile
            jobs = [(r.function(x, **call), pack(x)) for x, call in todo]

            def compile_one(job) -> bool:
                fn, (ints, floats) = job
                try:
                    fn.lower(r.params, self.pools, ints, floats, buf).compile()  # the arguments the run passes
                    return True
                except Exception:  # noqa: BLE001 - any failure: the serial run below compiles it again
                    return False

            with ThreadPoolExecutor(threads) as pool:
                for i, ok in enumerate(pool.map(compile_one, jobs)):
                    failures += not ok
                    report(i + 1, len(todo))
        serial = threads <= 1 or len(todo) <= 1
        for i, (x, call) in enumerate(todo):
            if call["num_steps"] is not None:
                _, self.pools, buf = r.run_decode_steps(self.pools, x, buf, num_steps=call["num_steps"],
                                                        greedy=call["greedy"])  # fmt: skip
            else:
                _, _, self.pools, buf = r.run_step(self.pools, x, buf, decode=call["decode"], greedy=call["greedy"])
            if serial:
                report(i + 1, len(todo))
        self._tokens = buf
        for n in sorted({bucket(n) for n in range(1, self.scheduler.max_num_seqs + 1)}):
            self._copy_blocks([0] * n, [0] * n)
        if self.host_pools is not None:  # every swap call size: the null block to host block 0 (idle: nothing
            for n in sorted({bucket(n) for n in range(1, self.swap_chunk + 1)}):  # is swapped out) and back
                self._swap_out([0] * n, [0] * n)
                self._swap_in([0] * n, [0] * n)
        jax.block_until_ready(self.pools)
        return {"shapes": len(self.runner.compiled) - before, "seconds": time.perf_counter() - t0,
                "parallel_failures": failures}  # fmt: skip

    def _sampling_row(self, s: Sequence, at: int | None = None):
        """Sampling parameters of s's next sampled token, which goes to index `at` of s.tokens (default: the end)."""
        sp = s.request.sampling
        seed = _mix_seed(s.request.seed, s.sample_index)
        at = len(s.tokens) if at is None else at
        return float(sp.temperature), int(sp.top_k), float(sp.top_p), seed, at - s.num_prompt

    def _multi_step_counts(self, seqs: list[Sequence]) -> list[int] | None:
        """Multi-step decode: how many tokens each decode row samples this round, after giving every row the
        slots of its extra steps (placeholders); None for a single step (decode_steps 1, beam search, or too
        few free blocks for the extra slots)."""
        k = self.decode_steps
        if k == 1 or any(s.request.beam for s in seqs):
            return None
        m = self.manager
        # the row's input token is already in s.tokens; it may sample up to max_tokens
        counts = [min(k, s.request.sampling.max_tokens - s.num_output) for s in seqs]
        need = sum(m.num_blocks_to_append(s.seq_id, n - 1) for s, n in zip(seqs, counts))
        if max(counts) == 1 or need > m.num_free_blocks:
            return None
        for s, n in zip(seqs, counts):
            if n > 1:
                extra = [UNKNOWN_TOKEN] * (n - 1)
                cow = m.append_slots(s.seq_id, extra, advance=False)
                assert not cow, "the round's first slot already made the last block private"
                s.tokens.extend(extra)
        return counts

    def _greedy(self, seqs) -> bool:
        return all(s.request.sampling.greedy for s in seqs)

    @staticmethod
    def _forks_now(s: Sequence) -> bool:
        """Whether s's next sampled token is the first of an `n > 1` request (its samples fork from its logits)."""
        req = s.request
        return req.sampling.n > 1 and len(req.seqs) == 1 and len(s.tokens) == s.num_prompt

    @classmethod
    def _needs_host(cls, s: Sequence) -> bool:
        """Whether s's sampled token must be handled on the host before the next schedule: beam search picks
        beams from the logits, and an `n > 1` request forks its samples from the first token's logits."""
        return s.request.beam or cls._forks_now(s)

    def _dispatch(self, sched: SchedulerOutput) -> _Flight | None:
        """Launch the step's decode and prefill on the device, reading nothing back; the sampled rows."""
        bs, buf, parts = self.block_size, self._tokens, []
        sync = not self.async_scheduling
        if sched.decode:
            seqs = sched.decode
            counts = self._multi_step_counts(seqs)  # a prefill chunk, if any, runs in a call of its own
            b = self._rows_bucket(len(seqs))
            table = partial(self.manager.block_table, copy=False)  # read only, before the tables change
            starts = [len(s.tokens) - (counts[k] if counts else 1) + 1 for k, s in enumerate(seqs)]
            rows = [([s.tokens[p - 1]], p - 1, table(s.seq_id), *self._sampling_row(s, p))
                    for s, p in zip(seqs, starts)]  # fmt: skip
            # a token the device has not returned yet comes from the previous step's token buffer
            src = [-1 if s.tokens[p - 1] != UNKNOWN_TOKEN else s.inflight for s, p in zip(seqs, starts)]
            width = self._width_bucket(max(len(s.tokens) for s in seqs))
            x = build_inputs(rows, block_size=bs, chunk=1, width=width, batch=b, src_rows=src)
            greedy = self._greedy(seqs)
            if counts:
                x = dataclasses.replace(x, query_lens=np.asarray(counts + [0] * (b - len(seqs)), np.int32))
                steps, self.pools, buf = self.runner.run_decode_steps(self.pools, x, buf, num_steps=self.decode_steps,
                                                                      greedy=greedy)  # fmt: skip
                part = _Part(seqs, list(range(len(seqs))), None, 0, True, starts, steps, counts)
                self.last_decode_steps = max(counts)
            else:
                _, logits, self.pools, buf = self.runner.run_step(self.pools, x, buf, decode=True, greedy=greedy)
                part = _Part(seqs, list(range(len(seqs))), logits, 0, True, starts)
            for s in seqs:
                s.num_computed = len(s.tokens)  # the manager hears of it in _settle, once the token is known
            parts.append(part)
            sync = sync or any(s.request.beam for s in seqs)
        if sched.prefill:
            chunks = sched.prefill
            b = self._rows_bucket(len(chunks))
            chunk = bucket(max(n for _, _, n in chunks), MIN_CHUNK)
            width = self._prefill_width(max(start + n for _, start, n in chunks))
            rows = [(s.tokens[start : start + n], start, self.manager.block_table(s.seq_id)[:width],
                     *self._sampling_row(s)) for s, start, n in chunks]  # fmt: skip
            x = build_inputs(rows, block_size=bs, chunk=chunk, width=width, batch=b)
            greedy = self._greedy(s for s, _, _ in chunks)
            _, logits, self.pools, buf = self.runner.run_step(self.pools, x, buf, decode=False, greedy=greedy)
            half = self.runner.token_slots // 2
            done, idx = [], []
            for r, (s, start, n) in enumerate(chunks):
                s.num_computed = start + n
                self.manager.mark_computed(s.seq_id, start + n)
                if s.num_computed == len(s.tokens):  # the prompt is complete: this row sampled a token
                    done.append(s)
                    idx.append(half + r)
            if done:
                parts.append(_Part(done, idx, logits, half, False, [len(s.tokens) for s in done]))
                sync = sync or any(self._needs_host(s) for s in done)
        self._tokens = buf
        if not parts:
            return None
        if self.events is not None:
            self.events.append(("dispatch", self._step))
        if not sync:
            for part in parts:
                part.logits = None  # the host needs none: keep no [B, V] array alive for a step longer
                if part.steps is not None:
                    part.steps.copy_to_host_async()
            buf.copy_to_host_async()  # queued right behind this step, not behind the next one
        return _Flight(self._step, buf, parts, sync)

    def _settle(self, flight: _Flight) -> None:
        """After the previous step landed: the flight's rows that still run await their token from it."""
        for part in flight.parts:
            for s, i, start in zip(part.seqs, part.idx, part.starts):
                if s.status is SeqStatus.FINISHED:  # stopped by the token the previous step sampled
                    continue
                if part.decode:  # its input token is known now (prefix-cache hashes need the value); a
                    self.manager.mark_computed(s.seq_id, start)  # multi-step round's placeholders are not
                s.inflight = i

    def _release_at_length(self, flight: _Flight) -> None:
        """Sequences whose token in flight is their last (max_tokens) give their blocks back now, so the next
        schedule sees the same free blocks as in synchronous mode; the token itself lands with the flight."""
        for part in flight.parts:
            for s, i in zip(part.seqs, part.idx):
                if s.inflight == i and s.num_output + 1 >= s.request.sampling.max_tokens:
                    self.scheduler.release_seq(s)
                    req = s.request
                    if all(q.status is SeqStatus.FINISHED for q in req.seqs):
                        self.scheduler.remove(req)

    def _land(self, flight: _Flight, touched: dict[str, Request]) -> None:
        """Read a dispatched step's sampled tokens (one device->host copy) and do their bookkeeping."""
        if self.events is not None:
            self.events.append(("read", flight.step))
        # one device->host copy per part kind: the token buffer (single steps, prefill) and a multi-step round's
        # tokens; a round of decode rows alone copies only the latter
        values = np.asarray(flight.tokens).tolist() if any(p.steps is None for p in flight.parts) else None
        for part in flight.parts:
            # rows still waiting for this flight's tokens (the others stopped or were aborted meanwhile)
            live = [k for k, (s, i) in enumerate(zip(part.seqs, part.idx)) if s.inflight == i]
            for k in live:
                part.seqs[k].inflight = None
            if not live:
                continue
            seqs, starts = [part.seqs[k] for k in live], [part.starts[k] for k in live]
            if part.steps is not None:  # multi-step decode: row b's tokens are steps[:counts[b], b]
                steps = np.asarray(part.steps).T.tolist()
                tokens = [steps[part.idx[k]][: part.counts[k]] for k in live]
                self._after_sampling(seqs, starts, tokens, None, [], 0, touched)
            else:
                rows = [part.idx[k] for k in live]
                self._after_sampling(seqs, starts, [[values[r]] for r in rows], part.logits, rows, part.offset,
                                     touched)  # fmt: skip

    # After sampling: forks, beams, stops ------------------------------------------------------------------
    def _after_sampling(self, seqs: list[Sequence], starts: list[int], tokens: list[list[int]], logits: jax.Array,
                        rows: Seq[int], offset: int, touched: dict[str, Request]) -> None:  # fmt: skip
        """seqs[i] sampled tokens[i] (one token, or a multi-step round's tokens), which belong at index starts[i]
        and on of its token list; its logits row is rows[i] - offset (one-token rows). Logits stay on the device
        unless a fork or beam search needs them.

        Adds the requests concerned to `touched`; finished requests leave the scheduler.
        """
        beams: dict[str, list[tuple[Sequence, int]]] = {}
        ended: list[Request] = []
        for i, (s, start, toks) in enumerate(zip(seqs, starts, tokens)):
            req = s.request
            touched[req.request_id] = req
            if req.beam:
                beams.setdefault(req.request_id, []).append((s, rows[i] - offset))
                continue
            if self._forks_now(s):  # the samples fork from the placed first token, then each is checked
                self._place(s, start, toks[0])
                for q in [s, *self._fork_samples(s, logits[rows[i] - offset])]:
                    if self._take(q, len(q.tokens), [q.pending]):
                        ended.append(req)
            elif self._take(s, start, toks):
                ended.append(req)
        for pairs in beams.values():
            req = pairs[0][0].request
            self._beam_step(req, [s for s, _ in pairs], logits[jnp.asarray([r for _, r in pairs])])
            ended.append(req)
        for req in ended:
            if req.finished:
                self.scheduler.remove(req)

    def _place(self, s: Sequence, index: int, token: int) -> None:
        """Put a sampled token where it belongs, by the sequence's state since the step was dispatched: into
        its slot at `index` when it has one (the next step or a multi-step round already gave it one), else as
        the pending token of a live sequence, else at the end (preempted by recomputation: its tokens become
        its prompt; or released at max_tokens)."""
        if index < len(s.tokens):
            s.tokens[index] = token
            if s.status is SeqStatus.RUNNING or s.status is SeqStatus.SWAPPED:
                self.manager.set_tokens(s.seq_id, index, [token])
        elif s.status is SeqStatus.RUNNING or s.status is SeqStatus.SWAPPED:
            s.pending = token  # gets a slot at the next schedule
        else:
            s.tokens.append(token)

    def _take(self, s: Sequence, start: int, tokens: list[int]) -> bool:
        """Place s's sampled tokens (index start on), counting each and stopping at a stop token or max_tokens;
        the slots after a stop token are dropped. Returns whether s finished."""
        sp = s.request.sampling
        # The leading tokens that have slots and end nothing go in as one slice (a multi-step round's tokens into
        # its placeholder slots: what the loop below does token by token); the loop takes the rest.
        live = s.status is SeqStatus.RUNNING or s.status is SeqStatus.SWAPPED
        m = min(len(tokens), len(s.tokens) - start) if live else 0
        if (m > 1 and start + m - s.num_prompt < sp.max_tokens
                and (sp.ignore_eos or not any(t in sp.stop_token_ids for t in tokens[:m]))):  # fmt: skip
            s.tokens[start : start + m] = tokens[:m]
            self.manager.set_tokens(s.seq_id, start, tokens[:m])
            self._tokens_generated += m
        else:
            m = 0
        for j in range(m, len(tokens)):
            token = tokens[j]
            index = start + j
            self._place(s, index, token)
            self._tokens_generated += 1
            stop = (not sp.ignore_eos) and token in sp.stop_token_ids
            last = j == len(tokens) - 1
            if s.status is SeqStatus.FINISHED:  # released ahead of its last token (by length)
                if stop or last:
                    del s.tokens[index + 1 :]
                    s.finish_reason = "stop" if stop else "length"
                    return True
                continue
            if stop or index + 1 - s.num_prompt >= sp.max_tokens:
                if s.pending is not None:
                    s.tokens.append(s.pending)
                    s.pending = None
                del s.tokens[index + 1 :]  # placeholders of steps past the stop (multi-step, async)
                s.finish_reason = "stop" if stop else "length"
                self.scheduler.release_seq(s)
                return True
        return False

    def _fork_samples(self, parent: Sequence, logits_row: jax.Array) -> list[Sequence]:
        req = parent.request
        sp = req.sampling
        children = []
        for i in range(1, sp.n):
            child = Sequence(self._new_seq_id(), req, list(parent.tokens), parent.num_prompt, sample_index=i,
                             status=SeqStatus.RUNNING, num_computed=parent.num_computed)  # fmt: skip
            self.manager.fork(parent.seq_id, child.seq_id)
            req.seqs.append(child)
            children.append(child)
        n = len(children)
        seeds = jnp.asarray([_mix_seed(req.seed, c.sample_index) for c in children], jnp.uint32)
        toks = _sample_many_jit(
            logits_row, jnp.full(n, sp.temperature, jnp.float32), jnp.full(n, sp.top_k, jnp.int32),
            jnp.full(n, sp.top_p, jnp.float32), seeds, jnp.zeros(n, jnp.int32),
        )  # fmt: skip
        for c, t in zip(children, np.asarray(toks)):
            c.pending = int(t) if sp.temperature > 0 else parent.pending
        return children

    def _beam_step(self, req: Request, beams: list[Sequence], logits: jax.Array) -> None:
        sp = req.sampling
        w = sp.beam_width
        cum = jnp.asarray([b.cum_logprob for b in beams], jnp.float32)
        scores, parents, toks = (np.asarray(a) for a in _top_candidates(logits, cum, 2 * w))
        new_len = len(beams[0].tokens) - beams[0].num_prompt + 1
        chosen = []
        for score, p, t in zip(scores, parents, toks):
            if not sp.ignore_eos and int(t) in sp.stop_token_ids:
                out = beams[p].tokens[beams[p].num_prompt :] + [int(t)]
                req.finished_beams.append((float(score) / new_len**sp.length_penalty, out, "stop"))
                continue
            chosen.append((float(score), int(p), int(t)))
            if len(chosen) == w:
                break
        self._tokens_generated += len(chosen)
        done = new_len >= sp.max_tokens or len(req.finished_beams) >= w
        if done:
            for score, p, t in chosen:
                out = beams[p].tokens[beams[p].num_prompt :] + [t]
                req.finished_beams.append((score / new_len**sp.length_penalty, out, "length"))
            for b in beams:
                self.scheduler.release_seq(b)
            return
        new = []
        for score, p, t in chosen:
            parent = beams[p]
            child = Sequence(self._new_seq_id(), req, list(parent.tokens), parent.num_prompt,
                             status=SeqStatus.RUNNING, num_computed=parent.num_computed)  # fmt: skip
            self.manager.fork(parent.seq_id, child.seq_id)
            child.pending, child.cum_logprob = t, score
            new.append(child)
        for b in beams:
            self.manager.free(b.seq_id)
            b.status = SeqStatus.FINISHED
        req.seqs = [s for s in req.seqs if s not in beams] + new

    # Outputs and stats ------------------------------------------------------------------------------------
    def _text(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    def _output(self, req: Request) -> RequestOutput:
        if req.error is not None:
            return RequestOutput(req.request_id, req.prompt, [], [], None, True, "error", [], error=req.error,
                                 metrics=self._metrics(req, 0, True))  # fmt: skip
        if req.beam:
            ranked = sorted(req.finished_beams, key=lambda x: -x[0])[: req.sampling.n]
            samples = [SampleOutput(t, self._text(t), why, score) for score, t, why in ranked]
            if not req.finished:
                best = max(req.seqs, key=lambda s: s.cum_logprob) if req.seqs else None
                live = best.output_ids() if best else []
                samples = [SampleOutput(live, None, None, None)]
            new = []
        else:
            samples = [SampleOutput(s.output_ids(), None, s.finish_reason) for s in req.seqs]
            new = samples[0].token_ids[req.num_streamed :]  # the first sample's tokens since its last report
            req.num_streamed = len(samples[0].token_ids)
        finished = req.finished
        if finished:
            for smp in samples:
                smp.text = self._text(smp.token_ids)
        head = samples[0] if samples else SampleOutput([], None, None)
        return RequestOutput(req.request_id, req.prompt, head.token_ids, new, head.text, finished, head.finish_reason,
                             samples, metrics=self._metrics(req, len(head.token_ids), finished))  # fmt: skip

    @staticmethod
    def _stamp(req: Request, has_output: bool, finished: bool) -> None:
        """Stamp the first report of a first token and of the finish (a report: an output, or the step that read
        the token when step(finished_only=True) builds none)."""
        now = time.monotonic()
        if has_output and req.first_token_time is None:
            req.first_token_time = now
        if finished and req.finish_time is None:
            req.finish_time = now

    @classmethod
    def _metrics(cls, req: Request, num_output: int, finished: bool) -> RequestMetrics:
        """Stamp the request's times (`_stamp`), then its latency so far."""
        cls._stamp(req, num_output > 0, finished)
        return RequestMetrics(req.arrival_time, req.first_token_time, req.finish_time, num_output)

    def stats(self) -> EngineStats:
        ms = self.manager.stats
        sch = self.scheduler
        return EngineStats(
            step=self._step,
            blocks_total=self.manager.num_blocks - 1,
            blocks_used=ms.num_used_blocks,
            blocks_free=ms.num_free_blocks,
            blocks_cached=ms.num_cached_blocks,
            prefix_hit_rate=ms.prefix_hit_rate,
            internal_fragmentation=ms.internal_fragmentation,
            blocks_saved_by_sharing=ms.blocks_saved_by_sharing,
            preemptions_recompute=sch.num_preempt_recompute,
            preemptions_swap=sch.num_preempt_swap,
            swap_bytes=ms.swap_bytes_moved or 0,
            running=sch.num_running_seqs(),
            waiting=len(sch.waiting),
            swapped=len(sch.swapped),
            tokens_generated=self._tokens_generated,
            compilations=len(self.runner.compiled),
            history=self.history,
        )

    def _snapshot(self) -> dict:
        """One history record: the stats, wall time, and the device's bytes in use where it reports them."""
        s = self.stats()
        rec = {k: v for k, v in s.__dict__.items() if k != "history"}
        rec["time"] = time.perf_counter()
        mem = jax.devices()[0].memory_stats() or {}
        rec["bytes_in_use"] = mem.get("bytes_in_use")
        rec["peak_bytes_in_use"] = mem.get("peak_bytes_in_use")
        return rec

    # Convenience ------------------------------------------------------------------------------------------
    def stream(self) -> Iterator[RequestOutput]:
        """Step until every request is done, yielding each request's output as tokens arrive."""
        while self.has_unfinished():
            yield from self.step()

    def run(self) -> dict[str, RequestOutput]:
        """Step until every request is done; each request's final output, by id (nothing streamed on the way)."""
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step(finished_only=True):
                final[out.request_id] = out
        return final


def generate(model, prompts: Seq[str | Seq[int]], sampling: SamplingParams | None = None, **engine_options
             ) -> list[RequestOutput]:  # fmt: skip
    """Generate for every prompt with a fresh paged engine; one `RequestOutput` per prompt, in order.

    A prompt that is bad input (empty, too long, can never fit) gets an output with `.error` set and no tokens;
    the other prompts are served normally. Offline generation wants throughput, not per-token latency, so the
    engine runs multi-step decode (`decode_steps=16`) unless `engine_options` say otherwise.
    """
    sampling = sampling or SamplingParams()
    engine = Engine(model, **({"decode_steps": GENERATE_DECODE_STEPS} | engine_options))
    ids: list[str | RequestOutput] = []
    for i, p in enumerate(prompts):
        try:
            ids.append(engine.add_request(p, sampling, request_id=f"req-{i}"))
        except ValueError as err:
            now = time.monotonic()
            ids.append(RequestOutput(f"req-{i}", [], [], [], None, True, "error", [], error=str(err),
                                     metrics=RequestMetrics(now, None, now, 0)))  # fmt: skip
    final = engine.run()
    return [x if isinstance(x, RequestOutput) else final[x] for x in ids]
