"""Run one library function in a fresh Python process and read its JSON result back.

Device memory peaks are process-wide (`memory_stats()["peak_bytes_in_use"]` cannot be reset), a step that ran out
of memory leaves buffers behind inside XLA, and XLA's autotuner keeps its results for the process: so every
measured configuration runs in a process of its own. A job is `(target, kwargs)`: `target` names a function as
"module:function" (e.g. "jkv.bench.memory:try_batch"); the child imports it, calls it with the JSON-decoded
kwargs and prints its JSON-able result on one line prefixed "RESULT ". Lines prefixed "LOG " (`log`) are progress,
echoed by the parent as they come. A child that dies (an exception, a crash inside a library, a timeout) gives no
result, and the tail of its stderr says why.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, NamedTuple

RESULT = "RESULT "
LOG = "LOG "
ROOT = Path(__file__).resolve().parents[2]  # the repository: a child imports jkv from here, installed or not
STDERR_TAIL = 3000  # characters of a child's stderr kept in its Outcome (log_file keeps all of it)

Job = tuple[str, dict]  # (target "module:function", keyword arguments)


class Outcome(NamedTuple):
    """What a child left: its RESULT (None if it printed none), the tail of its stderr, its exit status, and
    whether it was killed for running past its timeout."""

    result: dict | None
    stderr: str
    returncode: int | None
    timed_out: bool = False


class Child(NamedTuple):
    proc: subprocess.Popen
    err: IO[str]
    timer: threading.Timer | None
    fired: threading.Event


def log(msg: str) -> None:
    """A progress line from inside a child; the parent echoes it while the child runs."""
    print(f"{LOG}[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def command(target: str, kwargs: dict) -> list[str]:
    """The child's command line: this interpreter calling `main` below on the job."""
    return [sys.executable, "-c", "from jkv.bench.child import main; main()", target, json.dumps(kwargs)]


def child_env(env: dict | None) -> dict:
    """`env` (default: this process's environment) with the repository on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def start(target: str, kwargs: dict, env: dict | None = None, timeout: float | None = None) -> Child:
    """Start a child on one job (stdout piped, stderr to a temporary file); `timeout` seconds later it is killed."""
    err = tempfile.TemporaryFile("w+")  # noqa: SIM115 - finish() closes it
    proc = subprocess.Popen(command(target, kwargs), stdout=subprocess.PIPE, stderr=err, text=True,
                            env=child_env(env))  # fmt: skip
    fired, timer = threading.Event(), None
    if timeout is not None:

        def kill() -> None:
            fired.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
    return Child(proc, err, timer, fired)


def finish(child: Child, log_file: Path | None = None) -> Outcome:
    """Wait for a child, echoing its LOG lines as they come. log_file keeps all of its stderr (XLA's own
    messages: allocator dumps, autotuning failures)."""
    result = None
    assert child.proc.stdout is not None
    for line in child.proc.stdout:
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT) :])
        elif line.startswith(LOG):
            print("  " + line[len(LOG) :], end="", flush=True)
    child.proc.wait()
    if child.timer is not None:
        child.timer.cancel()
    child.err.seek(0)
    text = child.err.read()
    child.err.close()
    if log_file is not None:
        log_file.write_text(text)
    return Outcome(result, text[-STDERR_TAIL:], child.proc.returncode, child.fired.is_set())


def run(target: str, kwargs: dict, env: dict | None = None, *, log_file: Path | None = None,
        timeout: float | None = None) -> Outcome:  # fmt: skip
    """One job in a fresh process, to the end."""
    return finish(start(target, kwargs, env, timeout), log_file)


def _envs(env: dict | Sequence[dict] | None, n: int) -> list[dict | None]:
    return list(env) if isinstance(env, Sequence) else [env] * n


def run_side_by_side(jobs: Sequence[Job], env: dict | Sequence[dict] | None = None,
                     log_files: Sequence[Path | None] | None = None) -> list[Outcome]:  # fmt: skip
    """Every job in its own process, all at once (`env`: one for all or one per job); their outcomes in order."""
    envs = _envs(env, len(jobs))
    logs = list(log_files) if log_files is not None else [None] * len(jobs)
    started = [start(t, kw, e) for (t, kw), e in zip(jobs, envs, strict=True)]
    return [finish(c, f) for c, f in zip(started, logs, strict=True)]


def run_in_waves(jobs: Sequence[Job], env: dict | Sequence[dict] | None, width: int) -> list[Outcome]:
    """The jobs `width` side by side at a time, each wave waited for before the next starts; outcomes in order."""
    if width < 1:
        raise ValueError(f"width={width} must be at least 1.")
    envs = _envs(env, len(jobs))
    out: list[Outcome] = []
    for at in range(0, len(jobs), width):
        out += run_side_by_side(jobs[at : at + width], envs[at : at + width])
    return out


def main() -> None:
    """The child's side: `sys.argv[1:]` = target, JSON kwargs; prints the result as one RESULT line."""
    target, kwargs = sys.argv[1], json.loads(sys.argv[2])
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    print(RESULT + json.dumps(fn(**kwargs)), flush=True)
