"""`jkv serve --api-servers N`: N HTTP front-end processes (API servers) over one engine process, as vLLM runs
several API servers over one engine core.

One front end (jkv.serve.engine_process) spends its own core on requests and streamed chunks; at a small
model's rates that core, not the engine, limits what the server delivers. Here the server's first process is a
supervisor:
1. it binds --host:--port, so a port in use is reported before the model loads;
2. it starts the engine process with one pipe per front end and waits until the engine is built;
3. it starts N front-end processes, each running the usual app and uvicorn on the shared listening socket with
   its own pipe to the engine (the kernel hands each new connection to one of them);
4. it prints the listening line and waits. The engine process warms up once every front end has started, and
   prints `jkv serve: ready`.

Invariants: the supervisor holds no engine and serves no request; SIGTERM or SIGINT to it is passed to every
front end, which drains as a single server does (the engine process stops once all have left), and it exits 0
after they all exited 0; a front end that exits on its own stops the others and the server exits 1; front
ends run in their own process group (a terminal's Ctrl-C reaches only the supervisor, which passes it on once)
and each watches a pipe from the supervisor, so a supervisor killed outright still has its front ends drain and
exit, and then the engine process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from multiprocessing.connection import wait

log = logging.getLogger("jkv.serve")

ENGINE_STOP_S = 60.0  # after the last front end left, how long the engine process gets to stop before it is killed


def serve_front_ends(args, prog: str) -> int:
    """Run the supervisor (see the module docstring); the process's exit status."""
    from jkv.serve.chat import load_chat_template
    from jkv.serve.cli import print_listening
    from jkv.serve.engine_process import spawn_engine

    try:
        sock = _bind(args.host, args.port)
    except OSError as err:
        print(f"{prog}: cannot listen on {args.host}:{args.port} ({err.strerror or err}): choose another --host or "
              "--port, or stop what uses it.", file=sys.stderr)  # fmt: skip
        return 2
    print(f"jkv serve: starting on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
    try:
        load_chat_template(args.model if os.path.isdir(args.model) else None, args.chat_template)  # checked once here
        engine, conns, info = spawn_engine(args, args.api_servers)
    except (ValueError, RuntimeError) as err:
        sock.close()
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    ctx = multiprocessing.get_context("spawn")
    front_ends, lifelines = [], []
    for i, conn in enumerate(conns):
        keep, give = ctx.Pipe()
        proc = ctx.Process(target=front_end_main, args=(args, conn, give, info, sock), name=f"jkv-api-server-{i}")
        proc.start()
        give.close()
        conn.close()
        front_ends.append(proc)
        lifelines.append(keep)
    sock.listen(2048)  # connections wait in the backlog until a front end takes them
    host, port = sock.getsockname()[:2]
    sock.close()  # the front ends hold it
    print_listening(host, port, args.api_servers)
    status = _supervise(front_ends)
    engine.join(ENGINE_STOP_S)
    if engine.is_alive():
        log.warning("jkv serve: the engine process did not stop in %.0f s; killing it", ENGINE_STOP_S)
        engine.kill()
        engine.join(10)
    del lifelines  # kept open until here: a front end drains when its lifeline closes
    return status


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _supervise(front_ends: list) -> int:
    """Pass exit signals on to the front ends and wait until they all exited; the server's exit status."""
    stopping: list[int] = []  # the signals received
    failed: list[str] = []

    def stop_all(sig=signal.SIGTERM, frame=None) -> None:
        stopping.append(sig)
        for proc in front_ends:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(proc.is_alive() for proc in front_ends):
            wait([proc.sentinel for proc in front_ends if proc.is_alive()], timeout=1.0)
            for i, proc in enumerate(front_ends):
                if not proc.is_alive() and not stopping and not failed:
                    failed.append(f"API server {i} exited (status {proc.exitcode})")
                    log.error("jkv serve: %s; stopping the others", failed[0])
                    stop_all()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    clean = all(proc.exitcode == 0 for proc in front_ends)
    return 0 if stopping and not failed and clean else 1


def front_end_main(args, conn, lifeline, info: dict, sock: socket.socket) -> None:
    """One API-server process: the app and uvicorn on the shared socket, over its pipe to the engine process."""
    from jkv.serve.cli import make_app, run
    from jkv.serve.engine_process import EngineProcess

    os.setpgid(0, 0)  # out of the terminal's foreground group: signals come from the supervisor
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_watch_supervisor, args=(lifeline,), name="jkv-lifeline", daemon=True).start()
    loop = EngineProcess(conn, info, max_waiting=args.max_waiting)
    try:
        app = make_app(args, loop)
    except (ValueError, RuntimeError) as err:
        loop.stop()
        print(f"jkv serve: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(app, None, loop, args, sockets=[sock]))


def _watch_supervisor(lifeline) -> None:
    """Drain and exit (SIGTERM to this process) once the supervisor's end of `lifeline` closes."""
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGTERM)
