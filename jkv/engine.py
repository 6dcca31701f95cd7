"""The paged serving engine's facade: `Engine` (add_request / abort / step / stream / run / stats / close), the
offline `LLM` that keeps one engine for many `generate` calls, and `jkv.generate`.

One step is `scheduler.schedule()` -> `executor.execute()` (block copies, then the round's decode and prefill on
the device, then the previous round's tokens read back) -> `scheduler.update_from_output()`. The scheduler
(jkv.scheduler) is the only writer of request, sequence and block state; the executor (jkv.executor) owns the
device: the K/V pools, allocated once (sized by the planner unless `num_blocks` is given) and only ever updated in
place. Design notes: docs/engine.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jkv.block_manager import BlockManager
from jkv.compile_cache import active_store, open_store
from jkv.executor import ModelExecutor
from jkv.kv_cache import KVCache
from jkv.outputs import EngineStats, OutputBuilder, error_output
from jkv.pool_size import check_pool_fits, planned_blocks
from jkv.prompts import as_prompt_list, as_token_ids
from jkv.request import RequestOutput
from jkv.runner import StepRunner, compilations
from jkv.sampling import SamplingParams
from jkv.scheduler import Scheduler
from jkv.sharding import StepChannel, TensorParallel, broadcast, shard_bytes
from jkv.warmup import warm_up
from kvspec.layout import blocks_for_tokens, kv_bytes_per_token
from kvspec.layout import kv_dtype as planner_kv_dtype
from kvspec.shapes import ShapePolicy, bucket

# `generate()`'s default multi-step decode: 16 steps per round kept the GPU < 2 % idle where it was measured
# (docs/benchmarks.md, "generate() at K = 16").
GENERATE_DECODE_STEPS = 16


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return int(value)


class Engine:
    """A paged KV-cache engine over one model.

    Args:
        model: a `jkv.load_model(...)` result (anything with `.config`, `.params`, and optionally `.source`).
        num_blocks: KV blocks including the null block; None: from the planner for `hbm` bytes; without `hbm`, on
            a GPU for what JAX's pool has free, elsewhere a small pool (jkv.pool_size.HOST_DEFAULT_POOL_BYTES).
        hbm: the device memory to plan for (int bytes or '24GB'); checked against JAX's pool before anything is
            allocated.
        block_size: tokens per block (a power of two).
        max_num_seqs: most sequences running at once (the decode batch cap).
        max_num_batched_tokens: prefill tokens per step (the chunk budget; decodes run beside it).
        max_seq_len: longest prompt + output (default: the model's positions).
        enable_prefix_caching, watermark: see BlockManager.
        preemption_mode: 'recompute' or 'swap'; swap_blocks: host blocks for swapping.
        attention: 'auto' (Pallas on GPU, jnp reference elsewhere), 'pallas', 'reference' or 'interpret'.
        kv_dtype: storage of the pools: 'bfloat16' (default: the model's dtype), 'float16', 'float32', 'int8',
            'float8_e4m3fn', 'int4' (quantized on write, dequantized inside the attention kernels).
        sliding_window: attend to the last W tokens only; blocks out of the window are freed (default: the
            model's own window, e.g. Mistral's).
        tokenizer: for `.text` in outputs and string prompts (default: the checkpoint directory's own tokenizer
            files, else GPT-2's when the vocabulary is GPT-2's, else none: token ids only).
        record_history: keep a per-step stats record (memory timeline).
        compile_cache_dir: keep compiled steps there as serialized executables that a restart loads without
            tracing (jkv.compile_cache; one directory per process). JAX's own persistent cache is left as the
            process set it (jkv does not turn it on).
        async_scheduling: dispatch each step before reading the previous step's sampled tokens; outputs report a
            token one call later, with the same tokens, finish reasons and counts (docs/engine.md).
        decode_steps: multi-step decode: the decode rows of a round without beam search run up to this many steps
            in one device call; the host schedules and reads back once per round.
        stream_text: detokenize every sample as its tokens arrive, so each output's samples carry their text so
            far (a server streaming text); without it only samples with stop strings are detokenized on the way.
        tensor_parallel_size: shard the model over this many devices (jkv.sharding: Megatron-style on a ("tp",)
            mesh, K/V pools split by KV heads); 1 runs the same program on a one-device mesh. Under
            jax.distributed it must be every device of every process: process 0 schedules and steps, the others
            call `follow()`. The planner's figures (`plan`, `bytes_per_block`) are then per device.

    Device memory is freed when the engine is dropped or closed (`close()`, or `with jkv.Engine(...) as e:`).
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
        stream_text: bool = False,
        tensor_parallel_size: int = 1,
    ) -> None:
        self._closed = True  # until everything below is built
        config = model.config
        if sliding_window is not None:
            config = config.replace(sliding_window=_positive_int("sliding_window", sliding_window))
        if config.hybrid_attention:
            raise ValueError(f"{config.name} mixes sliding-window and full-attention layers, which this engine does "
                             "not serve yet: use a model whose layers all attend alike.")  # fmt: skip
        sliding_window = config.sliding_window  # the model's own window unless the caller set one
        self.config = config
        self.eos_token_ids = tuple(getattr(model, "eos_token_ids", ()))
        block_size = _positive_int("block_size", block_size)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two.")
        max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        self.decode_steps = _positive_int("decode_steps", decode_steps)
        self.max_seq_len = config.n_positions if max_seq_len is None else _positive_int("max_seq_len", max_seq_len)
        if self.max_seq_len > config.n_positions:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be between 1 and {config.n_positions}.")
        if num_blocks is not None and hbm is not None:
            raise ValueError("pass num_blocks or hbm, not both: num_blocks sizes the pool itself.")
        weight_dtype = jnp.dtype(model.dtype).name
        self.kv_dtype = kv_dtype or weight_dtype
        planner_kv_dtype(self.kv_dtype)  # validates the name
        tp = TensorParallel.create(config, tensor_parallel_size)  # checked before anything is allocated
        if tp.multi_process and (preemption_mode == "swap" or swap_blocks):
            raise ValueError("preemption_mode='swap' keeps host copies of the pools on one process: use "
                             "'recompute' under jax.distributed.")  # fmt: skip
        if tp.multi_process and compile_cache_dir is not None:
            raise ValueError("compile_cache_dir stores one process's executables: leave it unset under "
                             "jax.distributed.")  # fmt: skip
        self.tp = tp
        self.tensor_parallel_size = tp.size
        self.block_size = block_size
        self.plan = None
        params = tp.place_params(model.params, config)
        if num_blocks is None:
            num_blocks, self.plan = planned_blocks(
                config, hbm=hbm, weight_dtype=weight_dtype, kv=self.kv_dtype, block_size=block_size,
                max_seq_len=self.max_seq_len, max_num_seqs=max_num_seqs, prefill_chunk=max_num_batched_tokens,
                params_bytes=shard_bytes(params), tp=tp.size,
            )  # fmt: skip
        else:
            per_token = kv_bytes_per_token(config, planner_kv_dtype(self.kv_dtype), tp.size)
            check_pool_fits(num_blocks, block_size * per_token)
        if tp.multi_process:  # every process allocates process 0's pool (free memory may differ between hosts)
            num_blocks = int(broadcast(np.asarray([num_blocks], np.int32))[0])
        if compile_cache_dir is not None:
            # jkv's steps and block copies: serialized executables, loaded without tracing (jkv.compile_cache).
            # JAX's own persistent cache is not layered under it: on the CPU, an executable JAX loaded from its
            # cache serializes without its code, and the store would keep a file that fails when run.
            self.compile_store = open_store(Path(compile_cache_dir) / "executables")
        else:
            self.compile_store = active_store()
        sharded_config = tp.model_config(config)  # KV heads repeated when fewer than devices
        kv = KVCache(sharded_config, num_blocks=num_blocks, block_size=block_size, kv_dtype=self.kv_dtype,
                     swap_blocks=swap_blocks, max_seq_len=self.max_seq_len, sharding=tp.pools)  # fmt: skip
        self.bytes_per_block = kv.bytes_per_block
        manager = BlockManager(
            num_blocks, block_size, enable_prefix_caching=enable_prefix_caching, watermark=watermark,
            num_swap_blocks=swap_blocks, sliding_window=sliding_window, bytes_per_block=kv.bytes_per_block,
        )  # fmt: skip
        runner = StepRunner(params, sharded_config, block_size=block_size, backend=attention,
                            sliding_window=sliding_window, token_slots=2 * bucket(max_num_seqs), tp=tp)  # fmt: skip
        runner.use_pools(kv.pools)  # the backend is final from here on (step shapes depend on it)
        self._channel = None
        if tp.multi_process:
            self._channel = StepChannel()
            _check_same_engine(runner, kv)
            if jax.process_index() == 0:
                runner.channel = kv.channel = self._channel
        self.shapes = ShapePolicy(block_size, max_num_seqs, max_num_batched_tokens, self.max_seq_len, self.decode_steps,
                                  full_width_prefill=runner.backend in ("pallas", "interpret"))  # fmt: skip
        self.outputs = OutputBuilder(tokenizer if tokenizer is not None else _default_tokenizer(model, config))
        self.tokenizer = self.outputs.tokenizer
        self.scheduler = Scheduler(manager, self.shapes, preemption_mode=preemption_mode,
                                   async_scheduling=bool(async_scheduling), tokenizer=self.tokenizer,
                                   stream_text=bool(stream_text))  # fmt: skip
        self.manager = manager
        self.executor = ModelExecutor(runner, kv, self.shapes, partial(manager.block_table, copy=False))
        self.async_scheduling = bool(async_scheduling)
        self.record_history = record_history
        self.history: list[dict] = []
        self._compilations = 0
        self._request_ids = itertools.count()
        self._closed = False

    # Requests ---------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | Seq[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None) -> str:  # fmt: skip
        """Queue a request; returns its id. Raises ValueError (and changes nothing) for bad input."""
        self._check_open()
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a jkv.SamplingParams, not {type(sampling).__name__}.")
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use: pick another.")
        ids = self._check_request(prompt, sampling)
        extra = [t for t in self.eos_token_ids if t not in sampling.stop_token_ids and t < self.config.vocab_size]
        if extra and not sampling.ignore_eos:  # the model's end-of-sequence ids stop every request, as in vLLM
            sampling = dataclasses.replace(sampling, stop_token_ids=(*sampling.stop_token_ids, *extra))
        self.scheduler.add_request(request_id, ids, sampling)
        return request_id

    def _check_request(self, prompt, sampling: SamplingParams) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as lists of token ids.")
            prompt = self.tokenizer.encode(prompt)
        ids = as_token_ids(prompt, self.config.vocab_size)
        sampling.check_vocab(self.config.vocab_size)
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer and this engine has none: pass stop_token_ids instead.")
        total = len(ids) + sampling.max_tokens
        if total > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} exceeds the "
                f"{self.max_seq_len}-token context: shorten the prompt or lower max_tokens."
            )
        width = max(sampling.n, sampling.beam_width)
        if width > self.shapes.max_num_seqs:
            raise ValueError(f"n / beam_width {width} exceeds max_num_seqs={self.shapes.max_num_seqs}: lower it or "
                             "raise max_num_seqs.")  # fmt: skip
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
        return ids

    def abort(self, request_id: str) -> bool:
        """Stop a request: its blocks come back now and the next `step()` reports it finished with
        finish_reason 'aborted'. Returns False (and does nothing) for an id that is not running or waiting."""
        self._check_open()
        return self.scheduler.abort(str(request_id))

    def has_unfinished(self) -> bool:
        return not self._closed and (self.scheduler.has_work or self.executor.busy)

    # The step ---------------------------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduling round and model step; returns the requests that produced tokens or finished.

        With async scheduling, the tokens a step samples are read (and reported) during the next call.
        finished_only: report only the requests that finished (or failed) in this step (`run()`): the others'
        outputs are not built, though their metrics are stamped all the same.
        """
        self._check_open()
        before = compilations()
        sched = self.scheduler.schedule()
        landed = self.executor.execute(sched)  # dispatches this round, then reads the one before it
        touched = self.scheduler.update_from_output(landed)
        self.scheduler.update_after_dispatch(sched)
        if sched.read_now:
            touched |= self.scheduler.update_from_output(self.executor.wait())
        for req in [*sched.preempted, *sched.finished]:
            touched[req.request_id] = req
        self._compilations += compilations() - before
        if self.record_history:
            self.history.append(self._snapshot())
        return self.outputs.report(list(touched.values()), finished_only)

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

    # Warm-up, stats, lifecycle --------------------------------------------------------------------------------
    def warmup(self, greedy: bool | None = None, threads: int | None = None,
               progress: Callable[[int, int], None] | bool | None = None) -> dict:  # fmt: skip
        """Compile (or load from the compile cache) every step shape this engine can meet before serving
        (jkv.warmup.warm_up; progress=True shows a progress bar); call it on an idle engine. Returns {"shapes",
        "seconds", "parallel_failures", "loaded"}."""
        self._check_open()
        if self.has_unfinished():
            raise RuntimeError("warmup() runs on an idle engine: call it before adding requests or after they finish.")
        before = compilations()
        try:
            return warm_up(self.executor, self.shapes, greedy=greedy, threads=threads, progress=progress)
        finally:
            self._compilations += compilations() - before

    def step_shapes(self, greedy: bool | None = None) -> list[tuple[str, bool, tuple[int, int, int]]]:
        """Every model-step call this engine can make, as (kind, greedy, (rows, chunk, width))."""
        return [(s.kind, s.greedy, s.dims) for s in self.shapes.all_shapes(greedy)]

    def stats(self) -> EngineStats:
        sch = self.scheduler
        return EngineStats(
            step=sch.num_rounds, blocks=self.manager.stats, preemptions_recompute=sch.num_preempt_recompute,
            preemptions_swap=sch.num_preempt_swap, running=sch.num_running_seqs(), waiting=len(sch.waiting),
            swapped=len(sch.swapped), tokens_generated=sch.num_generated_tokens, compilations=self._compilations,
            history=self.history,
        )  # fmt: skip

    def _snapshot(self) -> dict:
        """One history record: the stats, wall time, and the device's bytes in use where it reports them."""
        rec = self.stats().record()
        rec["time"] = time.perf_counter()
        mem = jax.devices()[0].memory_stats() or {}
        rec["bytes_in_use"] = mem.get("bytes_in_use")
        rec["peak_bytes_in_use"] = mem.get("peak_bytes_in_use")
        return rec

    @property
    def events(self) -> list[tuple[str, int]] | None:
        """Set to a list to log ("dispatch", step) and ("read", step) as rounds are launched and read."""
        return self.executor.events

    @events.setter
    def events(self, value: list | None) -> None:
        self.executor.events = value

    @property
    def last_decode_rows(self) -> int:
        return self.executor.last_decode_rows

    @property
    def last_decode_steps(self) -> int:
        return self.executor.last_decode_steps

    def synchronize(self) -> None:
        """Block until nothing this engine launched is still running or copying on the device (for timing and
        tracing windows); reads nothing back and changes no state."""
        self._check_open()
        self.executor.synchronize()

    def follow(self) -> None:
        """Under jax.distributed, on every process but 0: make each device call process 0's engine makes, on this
        process's shards, until that engine closes; then close this one."""
        self._check_open()
        if self._channel is None or jax.process_index() == 0:
            raise RuntimeError("follow() runs on the processes other than 0 under jax.distributed; process 0 "
                               "schedules and steps (add_request / step / run).")  # fmt: skip
        try:
            while True:
                op, statics, arrays = self._channel.receive()
                if op == "close":
                    break
                self.executor.replay(op, statics, arrays)
        finally:
            self.close()

    def close(self) -> None:
        """Free the engine's device memory now; requests still running are dropped. Closing twice is harmless.
        Under jax.distributed, closing process 0's engine ends the other processes' `follow()`."""
        if not self._closed:
            self._closed = True
            if self._channel is not None and jax.process_index() == 0:
                self.executor.synchronize()
                self._channel.send("close")
            self.executor.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine is closed: create a new jkv.Engine to run more requests.")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_same_engine(runner: StepRunner, kv: KVCache) -> None:
    """Under jax.distributed: refuse, on every process, an engine whose device programs differ from process 0's
    (each process replays process 0's calls, so parameters, pools and step options must agree)."""
    pools = [(a.shape, a.dtype.name) for a in jax.tree.leaves(kv.pools)]
    params = [(a.shape, a.dtype.name) for a in jax.tree.leaves(runner.params)]
    mine = repr((runner.config, runner.backend, runner.window, runner.token_slots, runner.fuse_decode_write, pools,
                 params))  # fmt: skip
    digest = np.asarray([zlib.crc32(mine.encode()) & 0x7FFFFFFF], np.int32)
    if int(broadcast(digest)[0]) != int(digest[0]):
        raise ValueError(f"process {jax.process_index()} built an engine unlike process 0's (model, dtype, "
                         "kv_dtype, block_size, max_num_seqs or attention differ): give every process the same "
                         "model and engine options.")  # fmt: skip


def _default_tokenizer(model, config):
    """The checkpoint directory's own tokenizer files, else GPT-2's for GPT-2's vocabulary, else None."""
    import warnings

    from jkv.tokenizer import get_tokenizer, has_tokenizer_files

    source = getattr(model, "source", None)
    try:
        if source and has_tokenizer_files(source):
            return get_tokenizer(source)
        if config.vocab_size == 50257:
            return get_tokenizer()
    except ValueError as err:  # the tokenizer files are missing: token ids still work, text does not
        warnings.warn(f"{err} Outputs will carry token ids only (text=None).", stacklevel=3)
    return None


class LLM:
    """Offline generation over one engine kept for every call (vLLM's `LLM`): repeated `generate` calls pay for
    their tokens only, not for a new pool and new compilations. `close()` (or `with`) frees the engine."""

    def __init__(self, model, **engine_options) -> None:
        self.engine = Engine(model, **({"decode_steps": GENERATE_DECODE_STEPS} | engine_options))

    def generate(self, prompts, sampling: SamplingParams | None = None) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in order. A prompt that is bad input (empty, too long, can never fit)
        gets an output with `.error` set and no tokens; the other prompts are served normally."""
        engine = self.engine
        if engine.has_unfinished():
            raise RuntimeError("this LLM's engine still has requests: generate() runs on an idle engine.")
        sampling = sampling or SamplingParams()
        sampling.check_vocab(engine.config.vocab_size)  # shared by every prompt: refused once, not per prompt
        ids: list[str | RequestOutput] = []
        for i, p in enumerate(as_prompt_list(prompts)):
            try:
                ids.append(engine.add_request(p, sampling, request_id=f"req-{i}"))
            except ValueError as err:
                ids.append(error_output(f"req-{i}", p if not isinstance(p, str) else [], str(err)))
        final = engine.run()
        return [x if isinstance(x, RequestOutput) else final[x] for x in ids]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# `generate` keeps the last model's LLM: a call with the same model and options reuses it; another model or other
# options close it first, so the process holds one generate() engine at most. The model is held weakly: dropping
# it frees the engine too.
_last: tuple[weakref.ref, dict, LLM] | None = None


def _release_last() -> None:
    global _last
    if _last is not None:
        _last[2].close()
        _last = None


def generate_engine() -> Engine | None:
    """The engine `jkv.generate` keeps for its last model and options (None before the first call), for
    inspection: its stats, its device memory."""
    return None if _last is None else _last[2].engine


def generate(model, prompts, sampling: SamplingParams | None = None, **engine_options) -> list[RequestOutput]:
    """Generate for every prompt; one `RequestOutput` per prompt, in order (see `LLM.generate`).

    `prompts`: a string, a list of token ids, or a list of strings and token-id lists. Calls with the same model
    and engine options reuse one engine (multi-step decode, `decode_steps=16`, unless the options say otherwise).
    """
    global _last
    if _last is None or _last[0]() is not model or _last[1] != engine_options or _last[2].engine.closed:
        _release_last()
        llm = LLM(model, **engine_options)
        try:
            ref = weakref.ref(model)
            weakref.finalize(model, _release_last).atexit = False
        except TypeError:  # not weakly referable: held until another model or options come
            ref = lambda: model
        _last = (ref, dict(engine_options), llm)
    return _last[2].generate(prompts, sampling)
