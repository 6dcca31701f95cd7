"""`jkv serve` (its default, `--engine-process`): the engine loop in a process of its own, the HTTP front end in the
server's.

The front end and the engine loop then hold separate interpreters (and GILs): the event loop's per-chunk work
(JSON, SSE framing, the ASGI send path) no longer takes turns with the engine thread's scheduling and
detokenizing. vLLM splits its API server from its engine core the same way.

Two halves, one pipe (`multiprocessing`, spawn):
- `EngineProcess` (front end) has `EngineLoop`'s interface for the app and `generation`: `submit` / `abort` /
  `abort_everything` / `stop`, `ready`, `alive`, `error`, `warmup_progress`, `num_waiting`, `draining`. It reads
  the pipe on a thread of its own and hands what arrives to the event loop in one call, so handlers still only
  await their own queues.
- `engine_main` (engine process) builds the engine from the same flags, prints the plan, and runs an
  `EngineLoop` whose hand-offs (accepted or refused, each step's outputs, failures, warm-up progress, ready) go
  down the pipe instead of to an event loop; a reader thread takes adds, aborts, metric scrapes and the stop.

Invariants: the engine process owns the engine and its metrics (`/metrics` is the front end's counter of refused
requests followed by the engine process's registry); one step's outputs cross as one message; a request's
arrival time is the front end's (the host's monotonic clock is one for both processes), so time to first token
covers the hop; the engine process ignores SIGINT and SIGTERM (the front end drains, then stops it) and stops
by itself when the pipe closes (the front end died).
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
from jkv.serve.engine_loop import EngineDead, EngineLoop, RequestIntake, RequestStream

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

    def __init__(self, args, *, max_waiting: int, clock=time.monotonic, build: str = DEFAULT_BUILD) -> None:
        """Start the engine process with the parsed `jkv serve` flags and wait until its engine is built.
        ValueError: the flags or the model are bad (the engine process's one-line message); RuntimeError: it
        exited while loading. build: "module:function" the engine process calls as function(args,
        front_end=False) for (engine, metrics) (a benchmark's stand-in engine; default: the real one)."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._worker = ctx.Process(target=engine_main, args=(child, args, build), name="jkv-engine")
        self._worker.start()
        child.close()
        try:
            kind, info = self._conn.recv()
        except EOFError:
            self._worker.join(30)
            raise RuntimeError(f"the engine process exited while loading the model (status {self._worker.exitcode}): "
                               "see its messages above.") from None  # fmt: skip
        if kind == "build_error":
            self._worker.join(30)
            raise ValueError(info)
        super().__init__(max_waiting, clock)  # _left_waiting follows the engine process's count
        self.tokenizer, self.max_seq_len, self.vocab_size = info["tokenizer"], info["max_seq_len"], info["vocab_size"]
        self._send = _Pipe(self._conn).send  # the drain's timer thread sends too
        self._scrapes = itertools.count()
        self._pending: dict[str, RequestStream] = {}  # handed over, not yet accepted or refused
        self._streams: dict[str, RequestStream] = {}  # accepted, not finished
        self._scrape_waiters: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

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
        self._send(("abort_everything",))

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
        """Stop the engine process (it aborts what still runs and closes its engine); kill it past `timeout`."""
        self._send(("stop",))
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
            self._worker.join(1)
            self._fail(f"the engine process exited (status {self._worker.exitcode}): restart the server.")

    def _handle_all(self, batch: list) -> None:
        for message in batch:
            self._handle(message)

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "outputs":
            _, outs, self._left_waiting = message
            for out in outs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.queue.put_nowait(out)
                    if out.finished:
                        del self._streams[out.request_id]
        elif kind == "accepted":
            _, rid, error, self._left_waiting = message
            stream = self._pending.pop(rid, None)
            if stream is None or stream.accepted.done():
                return
            if error is None:
                self._streams[rid] = stream
                stream.accepted.set_result(None)
            else:
                kind, text = error
                stream.accepted.set_exception(ValueError(text) if kind == "value" else EngineDead(text))
        elif kind == "failed":
            stream = self._streams.pop(message[1], None)
            if stream is not None:
                stream.queue.put_nowait(EngineDead(message[2]))
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
    """The engine process's EngineLoop: its hand-offs go down the pipe (one message per step's outputs)."""

    def __init__(self, conn, engine, metrics, *, warmup: bool) -> None:
        # max_waiting: the front end bounds the queue; on_ready prints the ready line and tells the front end
        super().__init__(engine, metrics, max_waiting=1 << 62, warmup=warmup, on_ready=self._announce_ready)
        self.send = _Pipe(conn).send  # the engine thread and the reader thread send

    def _announce_ready(self, info: dict | None) -> None:
        from jkv.serve.cli import print_ready

        print_ready(info)
        self.send(("ready",))

    def add(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, arrival: float) -> None:
        """A request from the front end (the reader thread): into the inbox, as EngineLoop.submit puts it."""
        self._take(RequestStream(request_id, len(prompt_ids), None, arrival, None), prompt_ids, sampling)

    def _run(self) -> None:
        super()._run()
        if self.error is not None:
            self.send(("error", self.error))

    def _progress(self, done: int, total: int) -> None:
        super()._progress(done, total)
        self.send(("progress", done, total))

    def _hand_over(self, delivered) -> None:
        if delivered:
            self.send(("outputs", [out for _, out in delivered], self._left_waiting))

    def _push(self, stream: RequestStream, item) -> None:
        if isinstance(item, BaseException):
            self.send(("failed", stream.request_id, str(item)))

    def _settle(self, stream: RequestStream, error: BaseException | None) -> None:
        self.send(("accepted", stream.request_id, _refusal(error), self._left_waiting))


def _refusal(error: BaseException | None) -> tuple[str, str] | None:
    """How a refusal crosses the pipe: None (accepted), ("value", message) for bad input, ("dead", message)."""
    if error is None:
        return None
    return ("value" if isinstance(error, ValueError) else "dead", str(error))


def engine_main(conn, args, build: str = DEFAULT_BUILD) -> None:
    """The engine process: build the engine from `args`, report it, then serve the front end's commands."""
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end drains on these, then sends "stop"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from jkv.serve.cli import stop_engine

    module, _, name = build.partition(":")
    try:
        engine, metrics = getattr(importlib.import_module(module), name)(args, front_end=False)
    except (ValueError, RuntimeError) as err:
        conn.send(("build_error", str(err)))
        return
    conn.send(("built", {"tokenizer": engine.tokenizer, "max_seq_len": engine.max_seq_len,
                         "vocab_size": engine.config.vocab_size}))  # fmt: skip
    loop = _PipeEngineLoop(conn, engine, metrics, warmup=not args.no_warmup)
    try:
        _serve_commands(conn, loop, metrics)
    finally:
        stop_engine(loop, engine)


def _serve_commands(conn, loop: _PipeEngineLoop, metrics) -> None:
    """The engine process's reader: the front end's commands until "stop" or a closed pipe."""
    from prometheus_client import generate_latest

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the front end is gone
        kind = message[0]
        if kind == "add":
            loop.add(*message[1:])
        elif kind == "abort":
            loop.abort(message[1])
        elif kind == "abort_everything":
            loop.abort_everything()
        elif kind == "start":
            loop.start()
        elif kind == "metrics":
            loop.send(("metrics", message[1], generate_latest(metrics.registry)))
        elif kind == "stop":
            return
