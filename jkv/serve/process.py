"""A `jkv serve` child process on 127.0.0.1 and a free port, for tests and benchmarks: started, its listening
port read from the server's own startup line, (by default) awaited until it prints that it is ready (warm-up done),
its output kept, and stopped with SIGTERM (then SIGKILL) at the end. Every wait is bounded in time.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

_LISTENING = re.compile(r"jkv serve: listening on http://([\d.]+):(\d+)")  # printed whatever --log-level says
_READY = re.compile(r"^jkv serve: ready$")  # likewise, once warm-up is done


class ServerProcess:
    """`python -m jkv.serve ARGS --host 127.0.0.1 --port 0`; `.url` once it listens. wait_ready: also wait (within
    the same startup_timeout) until the server says it is ready; `.ready_line` is the index of that line in
    `.lines` (the listening line's is `.listening_line`)."""

    def __init__(self, args: list[str], *, env: dict | None = None, startup_timeout: float = 180.0,
                 wait_ready: bool = True) -> None:  # fmt: skip
        cmd = [sys.executable, "-m", "jkv.serve", *args, "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.listening_line: int | None = None
        self.ready_line: int | None = None
        deadline = time.monotonic() + startup_timeout
        m = self._await(_LISTENING, deadline, "did not start listening")
        self.listening_line = self._seen - 1
        self.url = f"http://{m.group(1)}:{m.group(2)}"
        if wait_ready:
            self.await_ready(max(0.0, deadline - time.monotonic()))

    def await_ready(self, timeout: float) -> None:
        """Wait until the server prints that it is ready (RuntimeError, and the server stopped, past `timeout`)."""
        if self.ready_line is None:
            self._await(_READY, time.monotonic() + timeout, "did not get ready")
            self.ready_line = self._seen - 1

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    _seen = 0  # lines taken from the queue so far

    def _await(self, pattern: re.Pattern, deadline: float, what: str) -> re.Match:
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self._seen += 1
            if m := pattern.search(line.rstrip("\n")):
                return m
        self.stop()
        raise RuntimeError(f"jkv serve {what}:\n" + "".join(self.lines[-40:]))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def terminate(self) -> None:
        """Send SIGTERM (drain and exit)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit status."""
        self.terminate()
        code = self.wait(timeout)
        if code is None:
            self.proc.kill()
            code = self.proc.wait(10)
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
