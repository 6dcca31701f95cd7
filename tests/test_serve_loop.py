"""`jkv serve`'s start-up, timeout and stop paths in one process, without a server process: the app over a real
engine loop (the tiny HF GPT-2 fixture), called through httpx's ASGI transport. Warm-up is replaced by a function
the test releases, so "starting" is observed by state, never by timing: the server answers `/health` with
"starting" and generation with 503 until warm-up is done, then serves. A request past `--request-timeout` gets 504
and is aborted; a stopped loop (SIGTERM past `--shutdown-timeout`) aborts what still runs and frees its blocks.
Every wait is bounded in count and time; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest

import jkv
from jkv.serve import generation as G
from jkv.serve import protocol as P
from jkv.serve.app import ServerState, create_app
from jkv.serve.cli import build_parser
from jkv.serve.engine_loop import EngineLoop, RequestStream
from jkv.serve.metrics import ServerMetrics, plan_terms

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
ENGINE = {"num_blocks": 32, "block_size": 8, "max_num_seqs": 2, "max_num_batched_tokens": 16, "decode_steps": 1,
          "async_scheduling": False}  # fmt: skip
WAIT_S = 120  # the bound on every wait below


@pytest.fixture(scope="module")
def model():
    return jkv.load_model(str(FIXTURE), dtype="float32")


class HeldWarmup:
    """Stands for `engine.warmup`: reports one of two shapes done, then waits until the test releases it."""

    def __init__(self, fail: bool = False) -> None:
        self.release, self.entered, self.fail = threading.Event(), threading.Event(), fail

    def __call__(self, progress=None, **_) -> dict:
        progress(1, 2)
        self.entered.set()
        assert self.release.wait(WAIT_S)
        if self.fail:
            raise RuntimeError("no memory for the step")
        progress(2, 2)
        return {"shapes": 2, "seconds": 0.0, "parallel_failures": 0, "loaded": 0}


def serving(model, warmup: HeldWarmup, ready: list, request_timeout: float | None = None):
    eng = jkv.Engine(model, **ENGINE)
    eng.warmup = warmup
    metrics = ServerMetrics(plan_terms(eng, 0), "tiny")
    loop = EngineLoop(eng, metrics, max_waiting=4, warmup=True, on_ready=ready.append)
    state = ServerState(loop, eng.tokenizer, "tiny", eng.max_seq_len, eng.config.vocab_size,
                        request_timeout=request_timeout)  # fmt: skip
    return eng, loop, create_app(state)


def wait_until(predicate) -> bool:
    for _ in range(WAIT_S * 20):
        if predicate():
            return True
        threading.Event().wait(0.05)
    return False


BODY = {"model": "tiny", "prompt": "Hello world", "max_tokens": 3, "temperature": 0}


def test_health_says_starting_and_generation_is_503_until_warmup_is_done(model):
    warmup, ready = HeldWarmup(), []
    eng, loop, app = serving(model, warmup, ready)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=WAIT_S) as c:
            loop.start()
            assert await asyncio.to_thread(warmup.entered.wait, WAIT_S)
            h = await c.get("/health")
            early = await c.post("/v1/completions", json=BODY)
            models = await c.get("/v1/models")  # no engine needed: answered while starting
            warmup.release.set()
            assert await asyncio.to_thread(wait_until, lambda: loop.ready)
            return h, early, models, await c.get("/health"), await c.post("/v1/completions", json=BODY)

    try:
        h, early, models, h_after, served = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    finally:
        loop.stop()
        eng.close()
    assert h.status_code == 503
    assert h.json() | {"message": ""} == {"status": "starting", "message": "", "shapes_done": 1, "shapes_total": 2}
    assert early.status_code == 503 and early.headers["retry-after"] == str(G.STARTING_RETRY_S)
    err = early.json()["error"]
    assert err["type"] == "server_starting" and err["message"] == (
        "the server is warming up (1 of 2 step shapes compiled): retry when GET /health says ok.")  # fmt: skip
    assert models.status_code == 200
    assert ready == [{"shapes": 2, "seconds": 0.0, "parallel_failures": 0, "loaded": 0}]  # once, after warm-up
    assert h_after.status_code == 200 and h_after.json() == {"status": "ok"}
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 3


def test_a_failed_warmup_is_reported_by_health(model):
    warmup, ready = HeldWarmup(fail=True), []
    eng, loop, app = serving(model, warmup, ready)
    loop.start()
    warmup.release.set()

    async def health():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=WAIT_S) as c:
            return await c.get("/health")

    try:
        assert wait_until(lambda: not loop.running)
        r = asyncio.run(health())
    finally:
        eng.close()
    assert r.status_code == 503 and "no memory for the step" in r.json()["error"]["message"] and not ready


def test_stop_during_warmup_ends_the_thread_without_serving(model):
    warmup, ready = HeldWarmup(), []
    eng, loop, _ = serving(model, warmup, ready)
    loop.start()
    assert warmup.entered.wait(WAIT_S)
    stopper = threading.Thread(target=loop.stop, args=(WAIT_S,))
    stopper.start()
    assert wait_until(lambda: loop._stop)
    warmup.release.set()  # the next progress report sees the stop
    stopper.join(WAIT_S)
    eng.close()
    assert not loop.running and not loop.ready and loop.error is None and not ready


class _Aborts:
    def __init__(self) -> None:
        self.ids: list[str] = []

    def abort(self, request_id: str) -> None:
        self.ids.append(request_id)


def test_request_timeout_answers_504_and_aborts():
    """A call whose engine requests never report (as if stuck behind others) past --request-timeout."""

    async def main():
        call = G.Call("completion", "tiny", [[1, 2]], [None], jkv.SamplingParams(max_tokens=4), call_id="c")
        call.streams = [RequestStream("c-0", 2, asyncio.get_running_loop(), 0.0, call.queue)]
        whole, streamed = _Aborts(), _Aborts()
        with pytest.raises(P.RequestError) as err:
            await G.respond(whole, call, None, 0.01, None)
        events = [e async for e in G.stream(streamed, call, 0.01, None)]
        return err.value, whole.ids, events, streamed.ids

    err, aborted, events, aborted_streamed = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert err.status == 504 and "--request-timeout of 0.01 s" in err.message and aborted == ["c-0"]
    payloads = [e.decode().removeprefix("data: ").strip() for e in events]
    assert json.loads(payloads[0])["error"]["code"] == 504 and payloads[-1] == "[DONE]"
    assert "c-0" in aborted_streamed


def test_the_drain_deadline_aborts_running_requests_and_ends_their_streams(model):
    """SIGTERM past --shutdown-timeout: `abort_everything` aborts what still runs (one request running, one
    waiting behind it); each SSE stream ends with finish_reason "abort" and [DONE], and the blocks are free."""
    eng = jkv.Engine(model, **ENGINE | {"max_num_seqs": 1})
    loop = EngineLoop(eng, ServerMetrics(plan_terms(eng, 0), "tiny"), max_waiting=4)
    loop.start()
    token_text = P.TokenText(eng.tokenizer)

    async def follow(call: G.Call, first: asyncio.Event) -> list[dict | str]:
        await G.submit(loop, call)
        chunks = []
        async for e in G.stream(loop, call, WAIT_S, token_text):
            data = e.decode().removeprefix("data: ").strip()
            chunks.append(data if data == "[DONE]" else json.loads(data))
            first.set()
        return chunks

    async def main():
        sampling = jkv.SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        calls = [G.Call("completion", "tiny", [eng.tokenizer.encode("Hello world")], [None], sampling,
                        include_usage=True, call_id=f"c{i}") for i in range(2)]  # fmt: skip
        first = asyncio.Event()
        tasks = [asyncio.ensure_future(follow(c, first)) for c in calls]
        await first.wait()  # the running request has streamed a chunk; the other waits for its seat
        loop.abort_everything()
        return await asyncio.gather(*tasks)

    try:
        streams = asyncio.run(asyncio.wait_for(main(), WAIT_S))
        blocks_used = eng.stats().blocks_used
    finally:
        loop.stop()
        eng.close()
    for chunks in streams:  # ..., the aborted finish, usage, [DONE]
        assert chunks[-1] == "[DONE]" and chunks[-3]["choices"][0]["finish_reason"] == "abort", chunks[-3:]
        assert chunks[-2]["usage"]["completion_tokens"] < 100
    assert blocks_used == 0 and not loop.running


def test_cli_defaults_bind_this_machine_only():
    args = build_parser("jkv serve").parse_args(["--model", "gpt2"])
    assert args.host == "127.0.0.1"
    text = build_parser("jkv serve").format_help()
    assert "persistent compilation cache" not in text and "compile_cache_dir" in text


def test_a_handler_behind_the_engine_sends_each_request_s_latest_output_once():
    def out(rid: str, n: int, finished: bool = False):
        return jkv.RequestOutput(rid, [1], list(range(n)), [], None, finished, None, [])

    async def main():
        q = asyncio.Queue()
        for item in (out("b", 1), out("a", 2), out("b", 3, True)):
            q.put_nowait(item)
        merged = G._latest(out("a", 1), q)
        q.put_nowait(out("a", 3))
        q.put_nowait(RuntimeError("engine gone"))
        return merged, G._latest(out("a", 2), q), G._latest(out("c", 1), q)

    merged, with_error, alone = asyncio.run(main())
    assert [(o.request_id, len(o.token_ids), o.finished) for o in merged] == [("a", 2, False), ("b", 3, True)]
    assert [getattr(o, "request_id", None) for o in with_error] == ["a", None] and len(with_error[0].token_ids) == 3
    assert [o.request_id for o in alone] == ["c"]


def test_tokenizer_flag_serves_a_model_with_another_tokenizer(tmp_path):
    from jkv.bench.serving import write_word_tokenizer
    from jkv.serve.cli import build_engine

    words = write_word_tokenizer(tmp_path / "words", 1000)  # the fixture's vocabulary: one word an id
    tok = jkv.get_tokenizer(words)
    assert tok.vocab_size == 1000 and tok.decode([5, 999, 6]) == "w5 w999 w6" and tok.encode("w7 w8") == [7, 8]

    def engine_args(*extra):
        return build_parser("jkv serve").parse_args(["--model", str(FIXTURE), "--dtype", "float32", "--num-blocks",
                                                     "16", "--no-warmup", *extra])  # fmt: skip

    engine, _ = build_engine(engine_args("--tokenizer", str(words)))
    try:
        assert engine.tokenizer.vocab_size == 1000
        rid = engine.add_request([1, 2, 3], jkv.SamplingParams(max_tokens=4, ignore_eos=True))
        out = engine.run()[rid]
        assert len(out.token_ids) == 4 and out.text.split() == [f"w{t}" for t in out.token_ids]
    finally:
        engine.close()
    with pytest.raises(ValueError, match="is not a directory with tokenizer.json"):
        build_engine(engine_args("--tokenizer", str(tmp_path)))
    too_big = write_word_tokenizer(tmp_path / "big", 1001)
    with pytest.raises(ValueError, match="has 1,001 tokens, more than .* vocabulary of 1,000"):
        build_engine(engine_args("--tokenizer", str(too_big)))


def test_a_front_end_whose_requests_did_not_move_still_hears_the_queue_empty(model):
    # --api-servers 2 with room for two waiting requests: front end 0's two fill the queue before the engine
    # thread starts, so front end 1's request is refused on a count of 2; once front end 0's finish, front end 1
    # must hear the count fall to 0, or it would refuse every later request on the stale count (as a front end
    # that received no output since did)
    import multiprocessing
    import time

    from jkv.serve.engine_process import _PipeEngineLoop

    eng = jkv.Engine(model, **(ENGINE | {"max_num_seqs": 1}))
    pairs = [multiprocessing.Pipe() for _ in range(2)]
    loop = _PipeEngineLoop([engine_end for _, engine_end in pairs], eng, ServerMetrics(plan_terms(eng, 0), "tiny"),
                           warmup=False, max_waiting=2)  # fmt: skip
    front_ends = [front_end for front_end, _ in pairs]
    heard: list[list] = [[], []]

    def read(front: int) -> list:
        while front_ends[front].poll(0):
            heard[front].append(front_ends[front].recv())
        return heard[front]

    try:
        sp = jkv.SamplingParams(max_tokens=12, ignore_eos=True)
        loop.add(0, "a", [1, 2, 3], sp, time.monotonic())
        loop.add(0, "b", [4, 5, 6], sp, time.monotonic())
        loop.add(1, "c", [7, 8], sp, time.monotonic())  # the engine thread has not started: nothing left the queue
        assert wait_until(lambda: any(m[0] == "accepted" for m in read(1)))
        refused = next(m for m in heard[1] if m[0] == "accepted")
        assert refused[1] == "c" and refused[2][0] == "overloaded" and refused[3] == 2
        loop.start()
        done = lambda: sum(1 for m in read(0) if m[0] == "outputs" for o in m[1] if o.finished) == 2  # noqa: E731
        assert wait_until(done)
        assert not any(m[0] == "outputs" for m in read(1))  # front end 1 received no output of its own,
        # yet its last word on the queue says it is empty
        assert wait_until(lambda: [m for m in read(1) if m[0] in ("waiting", "accepted")][-1][-1] == 0)
    finally:
        loop.stop()
