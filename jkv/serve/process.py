"""A `jkv serve` child process on 127.0.0.1 and a free port, for tests and benchmarks: started, its listening
port read from the server's own startup line, its output kept, and stopped with SIGTERM (then SIGKILL) at the end.
Every wait is bounded in time.
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


class ServerProcess:
    """`python -m jkv.serve ARGS --host 127.0.0.1 --port 0`; `.url` once started."""

    def __init__(self, args: list[str], *, env: dict | None = None, startup_timeout: float = 180.0) -> None:
        cmd = [sys.executable, "-m", "jkv.serve", *args, "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._await_listening(startup_timeout)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def _await_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if m := _LISTENING.search(line):
                return f"http://{m.group(1)}:{m.group(2)}"
        self.stop()
        raise RuntimeError("jkv serve did not start:\n" + "".join(self.lines[-40:]))

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
