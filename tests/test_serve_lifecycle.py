"""`jkv serve` under load and faults, on one real server process with room for one running and one waiting
request: a client that disconnects has its request aborted and its blocks freed, a full waiting queue answers
503 with Retry-After, a model without a chat template answers 400, and SIGTERM drains (last: it ends the
server). Every loop is bounded in count and time; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from polling import wait_for

from jkv.bench.procfs import alive, children, cmdline
from jkv.serve.process import ServerProcess

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
# the engine on a thread of the server, in a process of its own, and that process behind two API-server processes
MODES = [["--engine-thread"], ["--engine-process"], ["--engine-process", "--api-servers", "2"]]
MODE_IDS = ["engine-thread", "engine-process", "two-api-servers"]
LONG = {"model": "tiny", "prompt": "Hello world", "max_tokens": 110, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module", params=MODES, ids=MODE_IDS)
def server(request):
    args = [*request.param, "--model", str(FIXTURE), "--served-model-name", "tiny", "--dtype", "float32", "--no-warmup",
            "--num-blocks", "64", "--block-size", "8", "--max-num-seqs", "1", "--max-num-batched-tokens", "32",
            "--max-waiting", "1", "--decode-steps", "1", "--no-async-scheduling", "--shutdown-timeout", "60"]  # fmt: skip
    with ServerProcess(args) as proc:
        yield proc


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def events(response: httpx.Response):
    """The data payloads of a server-sent event stream, in order."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


def test_chat_without_a_template_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_disconnect_aborts_the_request_and_frees_its_blocks(server):
    aborted = metrics(server).get('jkv:request_finished_total{reason="aborted"}', 0.0)
    with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json=LONG | {"stream": True}) as r:
        first = next(events(r))
        assert json.loads(first)["choices"][0]["text"] is not None
    # the connection is closed after one chunk: the server aborts the request and gives its blocks back
    assert wait_for(lambda: metrics(server).get('jkv:request_finished_total{reason="aborted"}', 0.0) == aborted + 1)
    m = metrics(server)
    assert m['jkv:kv_blocks{state="used"}'] == 0 and m["jkv:num_requests_running"] == 0


def test_full_waiting_queue_answers_503_with_retry_after(server):
    # 8 requests at once for one running seat and one waiting place: those beyond it are refused on arrival,
    # well before the running one's 110 tokens are done
    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            calls = [c.post(server.url + "/v1/completions", json=LONG) for _ in range(8)]
            return await asyncio.wait_for(asyncio.gather(*calls), 300)

    replies = asyncio.run(main())
    refused = [r for r in replies if r.status_code == 503]
    served = [r for r in replies if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == 8, [r.status_code for r in replies]
    assert all(r.headers["retry-after"] == "1" and "waiting queue is full" in r.json()["error"]["message"]
               for r in refused)  # fmt: skip
    assert all(r.json()["usage"]["completion_tokens"] == 110 for r in served)
    assert metrics(server)['jkv:request_rejected_total{status="503"}'] == len(refused)


def test_sigterm_finishes_in_flight_requests_then_exits_0(server):
    body = LONG | {"max_tokens": 60, "stream": True}
    texts, reasons = [], []
    with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
        stream = events(r)
        next(stream)
        started = children(server.proc.pid)
        server.terminate()
        for data in stream:
            if data == "[DONE]":
                texts.append(data)
                break
            choice = json.loads(data)["choices"][0]
            reasons.append(choice["finish_reason"])
    assert texts == ["[DONE]"] and reasons[-1] == "length"  # the request in flight ran to its end
    assert server.wait(60) == 0
    # the engine process (--engine-process) and multiprocessing's helper end too
    assert wait_for(lambda: not any(map(alive, started))), [cmdline(p) for p in started if alive(p)]
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
