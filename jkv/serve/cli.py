"""The `jkv serve` command: load the model, build the engine from the flags (sized by the planner unless
`--num-blocks`), print the plan it serves with, listen, warm the engine up in the background (`/health` says
"starting" and generation requests get 503 until it is done; then `jkv serve: ready` is printed), and run the app
under uvicorn until SIGTERM or Ctrl-C.

SIGTERM drains: the server stops accepting (new requests get 503 while connections close), in-flight requests
finish within `--shutdown-timeout` seconds, the rest are aborted (a stream ends with finish_reason "abort" and
`data: [DONE]`, a whole response says "abort" too), and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("jkv.serve")

DRAIN_GRACE_S = 10.0  # after the drain's aborts, how long uvicorn waits for responses to end before cancelling them


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible server over jkv's paged engine.")
    p.add_argument("--model", required=True, help="preset name (random weights) or Hugging Face directory")
    p.add_argument("--served-model-name", help="the name clients send as 'model' (default: --model)")
    p.add_argument("--dtype", default="bfloat16", help="weights and compute: float32, bfloat16, float16")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a directory with tokenizer.json (or vocab.json + merges.txt) to use instead of the model's "
                        "own: for a checkpoint or preset without tokenizer files")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("JKV_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $JKV_API_KEY)")
    e = p.add_argument_group("engine")
    e.add_argument("--hbm", help="device memory to plan for, e.g. 24GB (default: what JAX's pool has free)")
    e.add_argument("--num-blocks", type=int, help="KV blocks (instead of planning them)")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-seqs", type=int, default=64)
    e.add_argument("--max-num-batched-tokens", type=int, default=512)
    e.add_argument("--max-seq-len", type=int, help="longest prompt + output (default: the model's positions)")
    e.add_argument("--kv-dtype", help="bfloat16, float16, float32, int8, float8_e4m3fn, int4")
    e.add_argument("--decode-steps", type=int, default=8, help="decode steps per device call (multi-step)")
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--no-async-scheduling", action="store_true")
    e.add_argument("--preemption-mode", default="recompute", choices=("recompute", "swap"))
    e.add_argument("--swap-blocks", type=int, default=0)
    e.add_argument("--sliding-window", type=int)
    e.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, dest="tensor_parallel_size",
                   help="shard the model over this many devices (Megatron-style; the plan is per device)")
    e.add_argument("--attention", default="auto", choices=("auto", "pallas", "reference", "interpret"))
    e.add_argument("--compile-cache", metavar="DIR",
                   help="jkv's store of compiled step executables (Engine(compile_cache_dir=DIR)): a restart loads "
                        "them instead of tracing and compiling again")  # fmt: skip
    e.add_argument("--no-warmup", action="store_true",
                   help="serve at once, compiling each step shape when a request first needs it (default: compile "
                        "or load every shape first, in the background, while /health says 'starting')")  # fmt: skip
    s = p.add_argument_group("serving")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="requests waiting for admission before new ones get 503 + Retry-After")
    s.add_argument("--request-timeout", type=float, help="seconds a request may run before it is stopped (504)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are aborted")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    s.add_argument("--chat-template", help="a Jinja2 chat template file (default: the model's tokenizer_config.json)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--engine-process", dest="engine_process", action="store_true", default=True,
                      help="(the default) run the engine loop in a process of its own, the HTTP front end in this "
                           "one: separate interpreters, so streaming chunks and engine steps do not take turns")  # fmt: skip
    mode.add_argument("--engine-thread", dest="engine_process", action="store_false",
                      help="run the engine loop in a thread of this process instead (one interpreter)")
    s.add_argument("--api-servers", type=int, default=1, metavar="N",
                   help="HTTP front-end processes sharing the port and the one engine process (default 1): more "
                        "when one front end's CPU limits the served rate")  # fmt: skip
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None, prog: str = "jkv serve") -> int:
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for name, value, low in (("--port", args.port, 0), ("--max-waiting", args.max_waiting, 1),
                             ("--max-body-bytes", args.max_body_bytes, 1), ("--api-servers", args.api_servers, 1)):  # fmt: skip
        if value < low:
            print(f"{prog}: {name} {value} must be at least {low}.", file=sys.stderr)
            return 2
    if args.api_servers > 1:
        if not args.engine_process:
            print(f"{prog}: --api-servers {args.api_servers} needs the engine in its own process: drop "
                  "--engine-thread.", file=sys.stderr)  # fmt: skip
            return 2
        from jkv.serve.front_ends import serve_front_ends

        return serve_front_ends(args, prog)
    try:
        app, engine, loop = build(args)
    except (ValueError, RuntimeError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    return run(app, engine, loop, args)


def build_engine(args):
    """(engine, its metrics) from the parsed flags, the plan printed; ValueError for a bad model or engine option."""
    import jkv
    from jkv.serve.metrics import ServerMetrics, plan_terms
    from jkv.sharding import shard_bytes

    tokenizer = None
    if args.tokenizer is not None:
        from jkv.tokenizer import get_tokenizer, has_tokenizer_files

        if not has_tokenizer_files(args.tokenizer):
            raise ValueError(f"--tokenizer {args.tokenizer} is not a directory with tokenizer.json (or vocab.json + "
                             "merges.txt): point it at one.")  # fmt: skip
        tokenizer = get_tokenizer(args.tokenizer)
    model = jkv.load_model(args.model, dtype=args.dtype)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size:,} tokens, more than {args.model}'s "
                         f"vocabulary of {model.config.vocab_size:,}: use the model's own tokenizer.")  # fmt: skip
    engine = jkv.Engine(
        model, num_blocks=args.num_blocks, hbm=args.hbm, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_seq_len=args.max_seq_len, kv_dtype=args.kv_dtype,
        enable_prefix_caching=not args.no_prefix_caching, preemption_mode=args.preemption_mode,
        swap_blocks=args.swap_blocks, sliding_window=args.sliding_window, attention=args.attention,
        compile_cache_dir=args.compile_cache, async_scheduling=not args.no_async_scheduling,
        decode_steps=args.decode_steps, stream_text=True, tensor_parallel_size=args.tensor_parallel_size,
        tokenizer=tokenizer,
    )  # fmt: skip
    if engine.tokenizer is None:
        engine.close()
        raise ValueError(f"{args.model} has no tokenizer files (tokenizer.json or vocab.json + merges.txt): add them, "
                         "or pass --tokenizer DIR.")  # fmt: skip
    name = served_name(args)
    param_bytes = shard_bytes(engine.executor.runner.params)  # one device's share, as the plan counts
    metrics = ServerMetrics(plan_terms(engine, param_bytes), name)
    print_plan(engine, param_bytes, name)
    return engine, metrics


def served_name(args) -> str:
    return args.served_model_name or args.model


def build(args):
    """(app, engine or None, engine loop) from the parsed flags; ValueError for a bad model or engine option.
    With --engine-process the engine lives in its own process (jkv.serve.engine_process) and None is returned for
    it; else it is built here and an `EngineLoop` thread runs it."""
    if args.engine_process:
        from jkv.serve.engine_process import EngineProcess

        engine, loop = None, EngineProcess.spawn(args, max_waiting=args.max_waiting)
    else:
        from jkv.serve.engine_loop import EngineLoop

        engine, metrics = build_engine(args)
        loop = EngineLoop(engine, metrics, max_waiting=args.max_waiting, warmup=not args.no_warmup,
                          on_ready=print_ready, progress_bar=sys.stderr.isatty())  # fmt: skip
    try:
        return make_app(args, loop), engine, loop
    except (ValueError, RuntimeError):
        stop_engine(loop, engine)
        raise


def make_app(args, loop):
    """The app over an engine loop (or an engine process's front end) with the served model's tokenizer, context
    and vocabulary; ValueError for a bad --chat-template."""
    from jkv.serve.app import ServerState, create_app
    from jkv.serve.chat import load_chat_template

    template = load_chat_template(args.model if os.path.isdir(args.model) else None, args.chat_template)
    state = ServerState(loop, loop.tokenizer, served_name(args), loop.max_seq_len, loop.vocab_size,
                        api_key=args.api_key, chat_template=template, request_timeout=args.request_timeout,
                        max_body_bytes=args.max_body_bytes)  # fmt: skip
    return create_app(state)


def print_plan(engine, param_bytes: int, name: str) -> None:
    from planner.units import human_bytes

    st = engine.stats()
    shapes = engine.shapes
    lines = [f"jkv serve: model {name} ({engine.config.name}), {st.blocks_total} KV blocks of {engine.block_size} "
             f"tokens ({human_bytes(st.blocks_total * engine.bytes_per_block)}, {engine.kv_dtype}), max batch "
             f"{shapes.max_num_seqs}, context {engine.max_seq_len}, decode steps {engine.decode_steps}"
             + (f", tensor parallel {engine.tensor_parallel_size} (figures per device)"
                if engine.tensor_parallel_size > 1 else "")]  # fmt: skip
    plan = engine.plan
    if plan is not None:
        lines.append(f"jkv serve: plan: parameters {human_bytes(plan.param_bytes)} + KV pool "
                     f"{human_bytes(plan.kv_pool_bytes)} + activation workspace {human_bytes(plan.activation_bytes)} "
                     f"+ runtime reserve {human_bytes(plan.reserve_bytes)} = {human_bytes(plan.peak_bytes)}")  # fmt: skip
    else:
        lines.append(f"jkv serve: no plan (pool sized directly): parameters {human_bytes(param_bytes)}")
    print("\n".join(lines), flush=True)


def print_ready(info: dict | None) -> None:
    """Called on the engine thread once it takes requests; the `ready` line is printed whatever --log-level says."""
    if info is not None:
        print(f"jkv serve: warm-up: {info['shapes']} step shapes ready ({info['loaded']} loaded from the compile "
              f"cache) in {info['seconds']:.1f} s", flush=True)  # fmt: skip
    print("jkv serve: ready", flush=True)


def run(app, engine, loop, args, sockets=None) -> int:
    """Serve `app` under uvicorn until an exit signal; sockets: listen on these (an API-server process of
    `--api-servers`, whose parent prints the listening line) instead of binding --host:--port."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, marking the engine loop draining on the first exit signal (and aborting what still runs
        `--shutdown-timeout` s later); SIGTERM (a planned stop) ends the process with status 0 rather than being
        re-raised once the server is down."""

        def handle_exit(self, sig, frame) -> None:
            if not loop.draining:  # the first exit signal: abort what is still running at the drain's deadline
                loop.draining = True
                timer = threading.Timer(args.shutdown_timeout, loop.abort_everything)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.should_exit:
                return
            if sockets is None:
                host, port = self.servers[0].sockets[0].getsockname()[:2]  # the real port, also for --port 0
                print_listening(host, port)
            loop.start()  # warm-up, then serving, on the engine thread; no handler runs before this line

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + DRAIN_GRACE_S, access_log=args.log_level == "debug")  # fmt: skip
    server = DrainingServer(config)
    if sockets is None:
        print(f"jkv serve: starting on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
    try:
        server.run(sockets=sockets)
    finally:
        stop_engine(loop, engine)
    return 0 if server.started else 1


def print_listening(host: str, port: int, api_servers: int = 1) -> None:
    more = f", {api_servers} API-server processes" if api_servers > 1 else ""
    print(f"jkv serve: listening on http://{host}:{port} (OpenAI API under /v1{more})", flush=True)


def stop_engine(loop, engine) -> None:
    """Stop the engine loop, then close its engine (None: --engine-process, whose process closes its own)."""
    loop.stop()
    if engine is None:
        return
    if loop.running:  # still inside one compilation: the process is ending, leave the engine to it
        log.warning("jkv serve: the engine thread did not stop in time; exiting without closing the engine")
    else:
        engine.close()
