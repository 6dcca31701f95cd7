"""`jkv serve` (its default, `--engine-process`): the engine loop in a process of its own, the HTTP front end in the
server's.

The front end and the engine loop then hold separate interpreters (and GILs): the event loop's per-chunk work
(JSON, SSE framing, the ASGI send path) no longer takes turns with the engine thread's scheduling and
detokenizing. vLLM splits its API server from its engine core the same way.

Two halves, one pipe per front end (`multiprocessing`, spawn; `jkv serve --api-servers N` runs N front-end
processes over one engine process, jkv.serve.front_ends):
- `EngineProcess` (front end) has `EngineLoop`'s interface for the app and `generation`: `submit` / `abort` /
  `abort_everything` / `stop`, `ready`, `alive`, `error`, `warmup_progress`, `num_waiting`, `draining`,
  `count_rejected`, `metrics_text`. It reads its pipe on a thread of its own and hands what arrives to the event
  loop in one call, so handlers still only await their own queues.
- `engine_main` (engine process) builds the engine from the same flags, prints the plan, and runs an
  `EngineLoop` whose hand-offs (accepted or refused, each step's outputs, failures, warm-up progress, ready) go
  down the pipe of the front end that sent the request, or of every front end, instead of to an event loop; a
  reader thread takes adds, aborts, refusal counts, metric scrapes and stops from every pipe.

Invariants: the engine process owns the engine and every metric, the front ends' refusals included, so any
front end's `/metrics` shows the whole server; one step's outputs cross as one message per front end; a
request's arrival time is its front end's (the host's monotonic clock is one for every process), so time to first
token covers the hop; the waiting-queue bound (`--max-waiting`) is the engine process's count over all front
ends; the engine warms up once every front end has started, so `ready` reaches them all; a front end's stop, its
drain deadline or its pipe closing (it died) aborts its own requests only; the engine process ignores SIGINT
and SIGTERM (the front ends drain, then stop it) and stops by itself once every pipe is stopped or closed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import signal
import threading
import time

from jkv.sampling import SamplingParams
from jkv.serve.engine_loop import EngineDead, EngineLoop, Overloaded, RequestIntake, RequestStream

log = logging.getLogger("jkv.serve")

SCRAPE_TIMEOUT_S = 10.0  # /metrics waits this long for the engine process's registry
DEFAULT_BUILD = "jkv.serve.cli:build_engine"


class _Pipe:
    """One end of the pipe, sent to from several threads; a send to a closed pipe is dropped (its reader thread
    sees the other side gone and reports it)."""

    def __init__(self, conn) -> None:
        self.conn, self._lock = conn, threading.Lock()

    def send(self, message) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                pass


class EngineProcess(RequestIntake):
    """The front end's handle on the engine process; see the module docstring."""

    def __init__(self, conn, info: dict, *, max_waiting: int, worker=None, clock=time.monotonic) -> None:
        """The front end of an engine process already built (`spawn_engine`): `conn` is this front end's pipe,
        `info` what the engine process reported once built; `worker`: the engine process, when this process
        started it (else its end is seen as the pipe closing)."""
        super().__init__(max_waiting, clock)
        self._conn, self._worker = conn, worker
        self.tokenizer, self.max_seq_len, self.vocab_size = info["tokenizer"], info["max_seq_len"], info["vocab_size"]
        self._send = _Pipe(conn).send  # the drain's timer thread sends too
        self._scrapes = itertools.count()
        self._pending: dict[str, RequestStream] = {}  # handed over, not yet accepted or refused
        self._streams: dict[str, RequestStream] = {}  # accepted, not finished
        self._scrape_waiters: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine_waiting = 0  # the engine process's count of waiting requests (all front ends), last heard
        self._stopped = False

    @classmethod
    def spawn(cls, args, *, max_waiting: int, clock=time.monotonic, build: str = DEFAULT_BUILD) -> EngineProcess:
        """Start the engine process with the parsed `jkv serve` flags, wait until its engine is built, and be its
        one front end. ValueError: the flags or the model are bad (the engine process's one-line message);
        RuntimeError: it exited while loading. build: see `spawn_engine`."""
        worker, conns, info = spawn_engine(args, 1, build)
        return cls(conns[0], info, max_waiting=max_waiting, worker=worker, clock=clock)

    @property
    def num_waiting(self) -> int:
        """The engine process's waiting requests (every front end's) plus this front end's not yet taken in."""
        return self._engine_waiting + len(self._pending)

    @property
    def alive(self) -> bool:
        return self.error is None and (self._worker is None or self._worker.is_alive())

    @property
    def running(self) -> bool:
        return self._worker.is_alive() if self._worker is not None else not self._stopped

    # The app's side (event loop) -------------------------------------------------------------------------------
    def start(self) -> None:
        """Follow the engine process from the running event loop and let it warm up and serve."""
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, name="jkv-engine-pipe", daemon=True).start()
        self._send(("start",))

    def _hand_in(self, stream: RequestStream, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self._pending[stream.request_id] = stream
        self._send(("add", stream.request_id, list(prompt_ids), sampling, stream.arrival))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def abort_everything(self) -> None:
        """Abort this front end's requests (its drain's deadline passed); other front ends' keep running."""
        self._send(("abort_everything",))

    def count_rejected(self, status: str) -> None:
        """A request this front end refused (the counter lives in the engine process, for every front end)."""
        self._send(("rejected", status))

    async def metrics_text(self) -> bytes:
        """The engine process's Prometheus registry, as text (empty when it does not answer in time)."""
        token = next(self._scrapes)
        waiter = asyncio.get_running_loop().create_future()
        self._scrape_waiters[token] = waiter
        self._send(("metrics", token))
        try:
            return await asyncio.wait_for(waiter, SCRAPE_TIMEOUT_S)
        except TimeoutError:
            return b""
        finally:
            self._scrape_waiters.pop(token, None)

    def stop(self, timeout: float = 30.0) -> None:
        """Leave the engine process: it aborts this front end's requests and, once every front end has left, stops
        (closing its engine). When this process started it, wait for that and kill it past `timeout`."""
        self._send(("stop",))
        self._stopped = True
        if self._worker is None:
            return
        self._worker.join(timeout)
        if self._worker.is_alive():
            log.warning("jkv serve: the engine process did not stop in %.0f s; killing it", timeout)
            self._worker.kill()
            self._worker.join(10)

    def _read(self) -> None:
        """The pipe's reader thread: blocking reads (an event loop's reader would make the pipe non-blocking, and
        a large message would then arrive in parts), whatever has arrived handed to the event loop at once."""
        while True:
            try:
                batch = [self._conn.recv()]
                while self._conn.poll():
                    batch.append(self._conn.recv())
            except (EOFError, OSError):
                self._call(self._gone)
                return
            self._call(self._handle_all, batch)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    def _gone(self) -> None:
        if self.error is None:
            status = "its pipe closed"
            if self._worker is not None:
                self._worker.join(1)
                status = f"status {self._worker.exitcode}"
            self._fail(f"the engine process exited ({status}): restart the server.")

    def _handle_all(self, batch: list) -> None:
        for message in batch:
            self._handle(message)

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "outputs":
            _, outs, self._engine_waiting = message
            for out in outs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.queue.put_nowait(out)
                    if out.finished:
                        del self._streams[out.request_id]
        elif kind == "accepted":
            _, rid, error, self._engine_waiting = message
            stream = self._pending.pop(rid, None)
            if stream is None or stream.accepted.done():
                return
            if error is None:
                self._streams[rid] = stream
                stream.accepted.set_result(None)
            else:
                stream.accepted.set_exception(_REFUSALS[error[0]](error[1]))
        elif kind == "failed":
            stream = self._streams.pop(message[1], None)
            if stream is not None:
                stream.queue.put_nowait(EngineDead(message[2]))
        elif kind == "waiting":
            self._engine_waiting = message[1]
        elif kind == "progress":
            self.warmup_progress = (message[1], message[2])
        elif kind == "ready":
            self.ready = True
        elif kind == "error":
            self._fail(message[1])
        elif kind == "metrics":
            waiter = self._scrape_waiters.get(message[1])
            if waiter is not None and not waiter.done():
                waiter.set_result(message[2])

    def _fail(self, error: str) -> None:
        """The engine is gone: every request waiting or running hears it, and /health says so."""
        self.error = error
        for stream in self._pending.values():
            if not stream.accepted.done():
                stream.accepted.set_exception(EngineDead(error))
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDead(error))
        self._pending.clear()
        self._streams.clear()


class _PipeEngineLoop(EngineLoop):
    """The engine process's EngineLoop: its hand-offs go down the pipe of the front end that sent the request
    (one message per step's outputs and front end), or of every front end (warm-up, ready, a failure)."""

    def __init__(self, conns, engine, metrics, *, warmup: bool, max_waiting: int) -> None:
        # on_ready tells the front ends, then prints the ready line
        super().__init__(engine, metrics, max_waiting=max_waiting, warmup=warmup, on_ready=self._announce_ready)
        self.sends = [_Pipe(conn).send for conn in conns]  # the engine thread and the reader thread send
        self._owner: dict[str, int] = {}  # request id -> its front end, from its add until it finished or was refused
        # the waiting count each front end last heard: a front end none of whose requests moved must still learn
        # that the queue emptied, or it would go on refusing requests on a stale count
        self._told = [0] * len(conns)

    def _broadcast(self, message) -> None:
        for send in self.sends:
            send(message)

    def _announce_ready(self, info: dict | None) -> None:
        from jkv.serve.cli import print_ready

        self._broadcast(("ready",))  # before the line: whoever reads it finds the front ends told
        print_ready(info)

    def add(self, front: int, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
            arrival: float) -> None:  # fmt: skip
        """A request from front end `front` (the reader thread): refused at once past the waiting bound (which
        counts every front end's requests), else into the inbox, as EngineLoop.submit puts it."""
        if self.num_waiting >= self.max_waiting:  # the front end answers 503 and counts it
            refusal = ("overloaded", f"the server's waiting queue is full ({self.max_waiting} requests): retry shortly.")
            self._told[front] = waiting = self.num_waiting
            self.sends[front](("accepted", request_id, refusal, waiting))
            return
        self._owner[request_id] = front
        self.metrics.api_server_requests.labels(api_server=str(front)).inc()
        self._take(RequestStream(request_id, len(prompt_ids), None, arrival, None), prompt_ids, sampling)

    def abort_front_end(self, front: int) -> None:
        """Abort every request of front end `front` (its drain deadline passed, it stopped, or it died)."""
        for rid, owner in self._owner.copy().items():
            if owner == front:
                self.abort(rid)

    def _run(self) -> None:
        super()._run()
        if self.error is not None:
            self._broadcast(("error", self.error))

    def _progress(self, done: int, total: int) -> None:
        super()._progress(done, total)
        self._broadcast(("progress", done, total))

    def _hand_over(self, delivered) -> None:
        by_front: dict[int, list] = {}
        for _, out in delivered:
            front = self._owner.get(out.request_id)
            if front is not None:
                by_front.setdefault(front, []).append(out)
                if out.finished:
                    del self._owner[out.request_id]
        waiting = self.num_waiting
        for front, outs in by_front.items():
            self._told[front] = waiting
            self.sends[front](("outputs", outs, waiting))

    def _refresh(self, force: bool = False) -> None:
        """After every turn of the engine thread: also tell each front end the waiting count, when it changed."""
        super()._refresh(force)
        waiting = self.num_waiting
        for front, told in enumerate(self._told):
            if told != waiting:
                self._told[front] = waiting
                self.sends[front](("waiting", waiting))

    def _push(self, stream: RequestStream, item) -> None:
        front = self._owner.pop(stream.request_id, None)
        if isinstance(item, BaseException) and front is not None:
            self.sends[front](("failed", stream.request_id, str(item)))

    def _settle(self, stream: RequestStream, error: BaseException | None) -> None:
        owner = self._owner.get if error is None else self._owner.pop
        front = owner(stream.request_id, None)
        if front is not None:
            self._told[front] = waiting = self.num_waiting
            self.sends[front](("accepted", stream.request_id, _refusal(error), waiting))


_REFUSALS = {"value": ValueError, "overloaded": Overloaded, "dead": EngineDead}  # how a refusal is raised again


def _refusal(error: BaseException | None) -> tuple[str, str] | None:
    """How a refusal crosses the pipe: None (accepted), else (kind, message) with a kind of `_REFUSALS`."""
    if error is None:
        return None
    return ("value" if isinstance(error, ValueError) else "dead", str(error))


def spawn_engine(args, front_ends: int, build: str = DEFAULT_BUILD):
    """Start the engine process with one pipe per front end and wait until its engine is built: (the process,
    the front ends' pipe ends, what it reported: tokenizer, max_seq_len, vocab_size). ValueError: the flags or
    the model are bad (the engine process's one-line message); RuntimeError: it exited while loading. build:
    "module:function" the engine process calls as function(args) for (engine, metrics) (a benchmark's stand-in
    engine; default: the real one)."""
    ctx = multiprocessing.get_context("spawn")
    pairs = [ctx.Pipe() for _ in range(front_ends)]
    worker = ctx.Process(target=engine_main, args=([child for _, child in pairs], args, build), name="jkv-engine")
    worker.start()
    conns = []
    for conn, child in pairs:
        child.close()
        conns.append(conn)
    try:
        kind, info = conns[0].recv()
    except EOFError:
        worker.join(30)
        raise RuntimeError(f"the engine process exited while loading the model (status {worker.exitcode}): see its "
                           "messages above.") from None  # fmt: skip
    if kind == "build_error":
        worker.join(30)
        raise ValueError(info)
    return worker, conns, info


def engine_main(conns, args, build: str = DEFAULT_BUILD) -> None:
    """The engine process: build the engine from `args`, report it (on the first pipe), then serve the front
    ends' commands."""
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front ends drain on these, then send "stop"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from jkv.serve.cli import stop_engine

    module, _, name = build.partition(":")
    try:
        engine, metrics = getattr(importlib.import_module(module), name)(args)
    except (ValueError, RuntimeError) as err:
        conns[0].send(("build_error", str(err)))
        return
    conns[0].send(("built", {"tokenizer": engine.tokenizer, "max_seq_len": engine.max_seq_len,
                             "vocab_size": engine.config.vocab_size}))  # fmt: skip
    loop = _PipeEngineLoop(conns, engine, metrics, warmup=not args.no_warmup, max_waiting=args.max_waiting)
    try:
        _serve_commands(conns, loop, metrics)
    finally:
        stop_engine(loop, engine)


def _serve_commands(conns, loop: _PipeEngineLoop, metrics) -> None:
    """The engine process's reader: every front end's commands until each has sent "stop" or closed its pipe.
    Warm-up starts once every front end has started (or left)."""
    from multiprocessing.connection import wait

    from prometheus_client import generate_latest

    open_ends = {conn: front for front, conn in enumerate(conns)}
    started: set[int] = set()  # front ends that have started or left
    begun = False
    while open_ends:
        for conn in wait(list(open_ends)):
            front = open_ends[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("stop",)  # the front end is gone
            kind = message[0]
            if kind == "add":
                loop.add(front, *message[1:])
            elif kind == "abort":
                loop.abort(message[1])
            elif kind == "abort_everything":
                loop.abort_front_end(front)
            elif kind == "rejected":
                metrics.rejected.labels(status=message[1]).inc()
            elif kind == "metrics":
                loop.sends[front](("metrics", message[1], generate_latest(metrics.registry)))
            elif kind in ("start", "stop"):
                started.add(front)
                if kind == "stop":
                    loop.abort_front_end(front)
                    del open_ends[conn]
                if not begun and open_ends and len(started) == len(conns):
                    begun = True
                    loop.start()
