"""`jkv serve --engine-process` where it differs from the engine thread: a bad model is one line and status 2
from the engine process's build, and an engine process that dies is reported (503 on /health and on new
requests, naming it) instead of hanging the front end. (Everything else runs in both modes in test_serve.py and
test_serve_lifecycle.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from jkv.serve.process import ServerProcess

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
ARGS = ["--engine-process", "--model", str(FIXTURE), "--served-model-name", "tiny", "--dtype", "float32",
        "--no-warmup", "--num-blocks", "32", "--block-size", "8", "--max-num-seqs", "2",
        "--max-num-batched-tokens", "16"]  # fmt: skip


def test_a_bad_model_is_one_line_and_status_2(tmp_path):
    missing = tmp_path / "no-such-model"
    r = subprocess.run([sys.executable, "-m", "jkv.serve", "--engine-process", "--model", str(missing)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("python -m jkv.serve:")]
    assert len(lines) == 1 and "no-such-model" in lines[0], r.stderr[-2000:]


def _engine_pid(server: ServerProcess) -> int:
    """The front end's child that runs jkv's engine (not multiprocessing's resource tracker)."""
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        for pid in map(int, (task / "children").read_text().split()):
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise AssertionError("no engine process under the server")


def test_a_dead_engine_process_is_reported_not_hung():
    with ServerProcess(ARGS) as server:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        os.kill(_engine_pid(server), signal.SIGKILL)
        health = None
        for _ in range(100):  # bounded: the front end notices the closed pipe within moments
            health = httpx.get(server.url + "/health", timeout=10)
            if health.status_code == 503:
                break
            time.sleep(0.05)
        assert health.status_code == 503 and "engine process exited" in health.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]
