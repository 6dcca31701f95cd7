"""The server's one engine loop: a background thread that owns the `jkv.Engine` and steps it while any request
exists, and the asyncio side that handlers talk to.

Handlers never touch the engine. `submit()` hands a request to the thread through a queue and awaits the thread's
verdict (accepted, or the engine's ValueError for bad input); the thread then pushes each `RequestOutput` the
engine reports into the request's `RequestStream` with `loop.call_soon_threadsafe`, so a handler only ever awaits
its own stream. `abort()` is queued the same way. The thread adds and aborts between steps, so a bad request or
a vanished client never disturbs the others, and a multi-step round's tokens reach their streams as the round
lands.

Start-up: the server listens before the engine is warm. The thread's first job is `engine.warmup()` (every step
shape compiled or loaded from the compile cache); until it is done `ready` is False, `/health` says "starting"
with the shapes done so far, and `submit()` refuses requests (503: `NotReady`). A stop during warm-up ends it at
the next shape.

Invariants: only the engine thread calls the engine (warm-up, requests, aborts, steps, stats); a stream's queue is
written only through the event loop (`call_soon_threadsafe`); `num_waiting` counts requests handed over but not yet
admitted by the scheduler, which is what the overload bound (`max_waiting`) limits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from jkv.request import RequestOutput
from jkv.sampling import SamplingParams
from jkv.serve.metrics import ServerMetrics

log = logging.getLogger("jkv.serve")

IDLE_WAIT_S = 0.5  # the idle thread wakes at least this often (a missed wake-up costs at most this much)


class Overloaded(Exception):
    """The waiting queue is full (or the server is draining): answer 503 with Retry-After."""


class NotReady(Overloaded):
    """The engine is still warming up: answer 503 with Retry-After."""


class _WarmupStopped(Exception):
    """Raised from warm-up's progress report when the loop is stopped during warm-up."""


class EngineDead(Exception):
    """The engine loop stopped on an internal error: every request fails until the server restarts."""


@dataclass(eq=False)
class RequestStream:
    """One engine request as a handler sees it: its outputs (each carrying everything so far, the last one
    finished) or the exception that ended it arrive in `queue`, which several requests of one HTTP call share."""

    request_id: str
    prompt_len: int
    loop: asyncio.AbstractEventLoop
    arrival: float
    queue: asyncio.Queue
    accepted: asyncio.Future | None = None
    # engine-thread bookkeeping (latency metrics)
    last_token_time: float | None = None
    num_tokens: int = 0
    first_token_seen: bool = False
    queued_seen: bool = False


class RequestIntake:
    """What handlers call to hand requests to an engine loop and what they read of its state; `_hand_in` is how
    a request reaches the engine (EngineLoop: its thread's inbox; EngineProcess: the pipe to its process)."""

    def __init__(self, max_waiting: int, clock=time.monotonic) -> None:
        self.max_waiting = max_waiting
        self.clock = clock
        self._ids = itertools.count()
        self.draining = False
        self.error: str | None = None
        self._handed = 0  # requests handed in
        self._left_waiting = 0  # of those: refused, admitted by the scheduler, or finished unadmitted (engine side)
        self.ready = False  # warm-up done: requests are taken
        self.warmup_progress: tuple[int, int] | None = None  # (shapes done, shapes to do) while warming up

    @property
    def num_waiting(self) -> int:
        """Requests handed over and not yet admitted (the inbox and the scheduler's waiting queue)."""
        return self._handed - self._left_waiting

    @property
    def alive(self) -> bool:
        return self._worker.is_alive() and self.error is None

    @property
    def running(self) -> bool:
        """The engine loop's thread or process is still running (after stop(): it did not end in time)."""
        return self._worker.is_alive()

    def starting_message(self) -> str:
        done = self.warmup_progress
        what = f" ({done[0]} of {done[1]} step shapes compiled)" if done else ""
        return f"the server is warming up{what}: retry when GET /health says ok."

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def submit(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                     queue: asyncio.Queue) -> RequestStream:  # fmt: skip
        """Queue a request whose outputs go to `queue`; returns its stream once the engine accepted it. Raises
        ValueError (bad input, from the engine), Overloaded (queue full or draining), EngineDead."""
        if self.error is not None:
            raise EngineDead(self.error)
        if not self.ready:
            raise NotReady(self.starting_message())
        if self.draining:
            raise Overloaded("the server is shutting down: retry against another replica or after it restarts.")
        if self.num_waiting >= self.max_waiting:
            raise Overloaded(f"the server's waiting queue is full ({self.max_waiting} requests): retry shortly.")
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, len(prompt_ids), loop, self.clock(), queue)
        stream.accepted = loop.create_future()
        self._take(stream, prompt_ids, sampling)
        await stream.accepted  # raises the engine's ValueError for bad input
        return stream

    def _take(self, stream: RequestStream, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self._handed += 1
        self._hand_in(stream, prompt_ids, sampling)

    def _hand_in(self, stream: RequestStream, prompt_ids: list[int], sampling: SamplingParams) -> None:
        raise NotImplementedError

    _worker: threading.Thread  # what runs the engine loop (EngineProcess: its process)


class EngineLoop(RequestIntake):
    """Runs `engine` on a background thread; see the module docstring."""

    def __init__(self, engine, metrics: ServerMetrics, *, max_waiting: int, warmup: bool = False,
                 on_ready: Callable[[dict | None], None] | None = None, progress_bar: bool = False,
                 clock=time.monotonic) -> None:  # fmt: skip
        """warmup: run `engine.warmup()` on the thread before serving (else ready at once); on_ready(warm-up's
        info, or None without warm-up) is called on the thread once serving starts; progress_bar: show warm-up's
        rich progress bar on stderr."""
        super().__init__(max_waiting, clock)
        self.engine = engine
        self.metrics = metrics
        self._inbox: collections.deque = collections.deque()  # (stream, prompt ids, sampling) to add
        self._aborts: collections.deque = collections.deque()  # request ids to abort
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._stop = False
        self._abort_everything = False
        self.num_active = 0  # accepted and not finished
        self._warmup, self._on_ready, self._progress_bar = warmup, on_ready, progress_bar
        self._worker = threading.Thread(target=self._run, name="jkv-engine-loop", daemon=True)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    # Event-loop side ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker.start()

    def _hand_in(self, stream: RequestStream, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self._inbox.append((stream, prompt_ids, sampling))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone, timeout): its blocks are freed at the thread's next turn."""
        self._aborts.append(request_id)
        self._wake.set()

    def abort_everything(self) -> None:
        """Abort every request accepted so far (the drain's deadline passed): each stream hears its request finish
        as aborted, so its HTTP response ends properly. New requests are refused while draining."""
        self._abort_everything = True
        self._wake.set()

    def count_rejected(self, status: str) -> None:
        """A request the app refused, by HTTP status (the event loop; prometheus_client's counters are
        thread-safe)."""
        self.metrics.rejected.labels(status=status).inc()

    async def metrics_text(self) -> bytes:
        """The Prometheus text of every metric."""
        from prometheus_client import generate_latest

        return generate_latest(self.metrics.registry)

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything still running and end the thread (the engine stays open: its owner closes it)."""
        self._stop = True
        self._wake.set()
        if self._worker.ident is not None:  # started
            self._worker.join(timeout)

    # Engine thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        try:
            if not self._warm_up():
                return
            while not self._stop:
                self._take_inbox()
                self._take_aborts()
                if not eng.has_unfinished():
                    self._refresh(force=True)
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                self._deliver_all(eng.step())
                self._refresh()
            for rid in list(self._streams):
                eng.abort(rid)
            while eng.has_unfinished():  # report the aborts (and read a round still in flight)
                self._deliver_all(eng.step())
        except Exception as err:  # an engine bug: fail every request, /health says so
            log.exception("jkv serve: the engine loop stopped")
            self.error = f"the engine loop stopped on an internal error ({type(err).__name__}: {err}): restart the server."
            for stream in self._streams.values():
                self._push(stream, EngineDead(self.error))
            for stream, _, _ in self._inbox:
                self._settle(stream, EngineDead(self.error))

    def _warm_up(self) -> bool:
        """Warm the engine up (when asked), then mark the loop ready; False when stopped during warm-up."""
        info = None
        if self._warmup:
            from jkv.warmup import progress_bar

            with progress_bar() if self._progress_bar else contextlib.nullcontext() as bar:

                def report(done: int, total: int) -> None:
                    self._progress(done, total)
                    if bar is not None:
                        bar(done, total)
                    if self._stop:
                        raise _WarmupStopped()

                try:
                    info = self.engine.warmup(progress=report)
                except _WarmupStopped:
                    return False
        self.ready = True
        self._refresh(force=True)
        if self._on_ready is not None:
            self._on_ready(info)
        return True

    def _progress(self, done: int, total: int) -> None:
        self.warmup_progress = (done, total)

    def _take_inbox(self) -> None:
        while self._inbox:
            stream, ids, sampling = self._inbox.popleft()
            try:
                self.engine.add_request(ids, sampling, request_id=stream.request_id)
            except (ValueError, TypeError) as err:
                self._left_waiting += 1
                self._settle(stream, ValueError(str(err)))
                continue
            self._streams[stream.request_id] = stream
            self.num_active += 1
            self.metrics.prompt_tokens.inc(stream.prompt_len)
            self._settle(stream, None)

    def _take_aborts(self) -> None:
        while self._aborts:
            self.engine.abort(self._aborts.popleft())
        if self._abort_everything:
            for rid in list(self._streams):
                self.engine.abort(rid)

    def _deliver_all(self, outs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up of each event loop per step, not one per output."""
        now = self.clock()
        delivered = [(stream, out) for out in outs if (stream := self._deliver(out, now)) is not None]
        self._hand_over(delivered)

    def _hand_over(self, delivered: list[tuple[RequestStream, RequestOutput]]) -> None:
        """Put each output in its stream's queue, through its event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, out in delivered:
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
                pass

    def _deliver(self, out: RequestOutput, now: float) -> RequestStream | None:
        """Bookkeeping and metrics for one output; its stream (None for a request nobody follows)."""
        stream = self._streams.get(out.request_id)
        if stream is None:
            return None
        m, met = self.metrics, out.metrics
        if not stream.queued_seen and (met.scheduled_time is not None or out.finished):
            stream.queued_seen = True
            self._left_waiting += 1
            if met.scheduled_time is not None:
                m.queue_time.observe(max(0.0, met.scheduled_time - met.arrival_time))
        new = len(out.token_ids) - stream.num_tokens
        if new > 0:
            if not stream.first_token_seen:
                stream.first_token_seen = True
                m.ttft.observe(now - stream.arrival)
            elif stream.last_token_time is not None:
                # a multi-step round lands its tokens together: one observation per round, of the gap per token
                # (one per token would cost a locked observe per generated token on the engine thread)
                m.itl.observe((now - stream.last_token_time) / new)
            stream.last_token_time, stream.num_tokens = now, len(out.token_ids)
        if out.finished:
            del self._streams[out.request_id]
            self.num_active -= 1
            m.e2e.observe(now - stream.arrival)
            m.finished.labels(reason=out.finish_reason or "unknown").inc()
        return stream

    def _refresh(self, force: bool = False) -> None:
        self.metrics.refresh(self.engine, self.num_waiting, self.num_active, force=force)

    def _push(self, stream: RequestStream, item) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    def _settle(self, stream: RequestStream, error: BaseException | None) -> None:
        def settle() -> None:
            if not stream.accepted.done():
                if error is None:
                    stream.accepted.set_result(None)
                else:
                    stream.accepted.set_exception(error)

        try:
            stream.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
