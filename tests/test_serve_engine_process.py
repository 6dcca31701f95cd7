"""`jkv serve --engine-process` where it differs from the engine thread: a bad model is one line and status 2
from the engine process's build, and an engine process that dies is reported (503 on /health and on new
requests, naming it) instead of hanging the front end; with `--api-servers 2`, a supervisor killed outright
still takes its front ends and the engine process with it, and a front end that dies stops the server with
status 1. (Everything else runs in every mode in test_serve.py and test_serve_lifecycle.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from polling import wait_for

from jkv.bench.procfs import alive, children, cmdline, descendants, process_group
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


def test_api_servers_with_the_engine_thread_is_one_line_and_status_2():
    r = subprocess.run([sys.executable, "-m", "jkv.serve", "--engine-thread", "--api-servers", "2", "--model",
                        str(FIXTURE)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("python -m jkv.serve:")]
    assert len(lines) == 1 and "--api-servers 2" in lines[0] and "--engine-thread" in lines[0], r.stderr[-2000:]


def test_a_killed_supervisor_takes_its_api_servers_and_engine_with_it():
    with ServerProcess([*ARGS, "--api-servers", "2"]) as server:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        under = descendants(server.proc.pid)
        assert len(under) >= 3, under  # two API servers and the engine process, at least
        os.kill(server.proc.pid, signal.SIGKILL)
        assert server.wait(30) == -signal.SIGKILL
        assert wait_for(lambda: not any(map(alive, under))), [p for p in under if alive(p)]


def test_a_dead_api_server_stops_the_server_with_status_1():
    with ServerProcess([*ARGS, "--api-servers", "2"]) as server:
        under = descendants(server.proc.pid)
        front_ends = [pid for pid in under if process_group(pid) == pid]  # each API server leads its own group
        assert len(front_ends) == 2, [(pid, process_group(pid)) for pid in under]
        os.kill(front_ends[0], signal.SIGKILL)
        assert server.wait(90) == 1
        assert wait_for(lambda: not any(map(alive, under))), [p for p in under if alive(p)]


def _engine_pid(server: ServerProcess) -> int:
    """The front end's child that runs jkv's engine (not multiprocessing's resource tracker)."""
    for pid in children(server.proc.pid):
        if "resource_tracker" not in cmdline(pid):
            return pid
    raise AssertionError("no engine process under the server")


def test_a_dead_engine_process_is_reported_not_hung():
    with ServerProcess(ARGS) as server:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        os.kill(_engine_pid(server), signal.SIGKILL)
        # bounded: the front end notices the closed pipe within moments
        assert wait_for(lambda: httpx.get(server.url + "/health", timeout=10).status_code == 503, tries=100)
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and "engine process exited" in health.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]
