"""`jkv serve` end to end: one real server process on 127.0.0.1 (the tiny HF GPT-2 fixture with a chat template
added), talked to with the official `openai` client, raw `httpx` for malformed requests. Outputs are checked
against independent references: `jkv.generate` (greedy, n, beams) and the dense model's log-softmax (logprobs).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

import jkv
from jkv.serve.process import ServerProcess

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
# the engine on a thread of the server, in a process of its own, and that process behind two API-server processes
MODES = [["--engine-thread"], ["--engine-process"], ["--engine-process", "--api-servers", "2"]]
MODE_IDS = ["engine-thread", "engine-process", "two-api-servers"]
API_KEY = "test-key"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip
ENGINE = {"num_blocks": 64, "block_size": 8, "max_num_seqs": 8, "max_num_batched_tokens": 32}
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time", "A B C D"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat_model")
    for f in FIXTURE.iterdir():
        os.symlink(f, d / f.name)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return d


@pytest.fixture(scope="module", params=MODES, ids=MODE_IDS)
def server(model_dir, request):
    args = [*request.param, "--model", str(model_dir), "--served-model-name", "tiny", "--dtype", "float32", "--no-warmup",
            "--api-key", API_KEY, "--max-body-bytes", "4096", "--decode-steps", "4",
            *[f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]]  # fmt: skip
    with ServerProcess(args) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(model_dir):
    return jkv.load_model(str(model_dir))


@pytest.fixture(scope="module")
def tok(model):
    return jkv.get_tokenizer(model.source)


def reference(model, prompts, **sampling):
    """jkv.generate in this process (its own engine), the independent reference for the server's outputs."""
    return jkv.generate(model, prompts, sampling=jkv.SamplingParams(**sampling), **ENGINE)


def raw(server, path: str, body, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = json.dumps(body) if isinstance(body, (dict, list)) else body  # bytes, or an iterator of them (chunked)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json", **headers},
                      timeout=60, **kw)  # fmt: skip


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}


def test_greedy_completions_equal_generate(client, model):
    ref = reference(model, PROMPTS, max_tokens=8)
    out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [r.text for r in ref]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 8 * len(PROMPTS)
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    ids = [r.prompt_token_ids for r in ref[:2]]  # token-id prompts give the same: one list, and a list of lists
    assert client.completions.create(model="tiny", prompt=ids[0], max_tokens=8, temperature=0).choices[0].text == ref[0].text
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [r.text for r in ref[:2]]


def test_streaming_equals_generate(client, model):
    ref = reference(model, PROMPTS[:2], max_tokens=10)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    texts, reasons = ["", ""], [None, None]
    for ch in chunks[:-1]:
        for c in ch.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [r.text for r in ref] and reasons == ["length", "length"]
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


def test_n_samples_and_beams_equal_generate(client, model):
    ref = reference(model, PROMPTS[2], max_tokens=6, temperature=0.9, seed=7, n=3)[0]
    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=0.9, seed=7, n=3)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [s.text for s in ref.samples]
    ref = reference(model, PROMPTS[1], max_tokens=6, beam_width=3, n=2)[0]
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, n=2, best_of=3, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [s.text for s in ref.samples]


def test_stop_strings_are_never_emitted(client, model):
    full = reference(model, PROMPTS[0], max_tokens=24)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a stop string straddling tokens, in the middle of the output
    want = full[: full.index(stop)]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop, stream=True)]  # fmt: skip
    assert "".join(pieces) == want and all(stop not in p for p in pieces)


def test_stop_token_ids_end_the_output_at_that_token(client, model, tok):
    full = reference(model, PROMPTS[2], max_tokens=12)[0].token_ids
    k = 3 + next(i for i, t in enumerate(full[3:]) if t not in full[:3])  # a token first generated at position k
    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                    extra_body={"stop_token_ids": [full[k]]})  # fmt: skip
    c = out.choices[0]  # as vLLM: the stop token is generated and kept (it is not a special token)
    assert c.finish_reason == "stop" and out.usage.completion_tokens == k + 1 and c.text == tok.decode(full[: k + 1])


def test_logprobs_and_echo_equal_dense_log_softmax(client, model, tok):
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=3,
                                    echo=True)  # fmt: skip
    lp = out.choices[0].logprobs
    prompt = tok.encode(PROMPTS[1])
    gen = reference(model, PROMPTS[1], max_tokens=4)[0].token_ids
    ids = prompt + gen
    logp = np.asarray(jax_log_softmax(model.logits(ids)))  # [T, V]: position t predicts token t + 1
    want = [logp[t - 1, ids[t]] for t in range(1, len(ids))]
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=2e-4)
    assert out.choices[0].text.startswith(PROMPTS[1])
    for t in range(1, len(ids)):  # the top 3 alternatives, best first
        top = np.argsort(-logp[t - 1])[:3]
        got = sorted(lp.top_logprobs[t].values(), reverse=True)[:3]
        np.testing.assert_allclose(got, logp[t - 1, top], atol=2e-4)


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(x, axis=-1)


def test_chat_completion_uses_the_template(client, model):
    text = "<|user|>hi there\n<|assistant|>"  # TEMPLATE rendered by hand
    ref = reference(model, text, max_tokens=5)[0]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}],
                                         max_tokens=5, temperature=0)  # fmt: skip
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi there"}], max_tokens=5, temperature=0, stream=True)
        if c.choices]  # fmt: skip
    assert "".join(deltas) == ref.text


def test_32_concurrent_streaming_clients(server, model):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]
    ref = reference(model, prompts, max_tokens=5)

    async def one(c, p):
        text = ""
        async for ch in await c.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0, stream=True):
            text += ch.choices[0].text
        return text

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
            return await asyncio.wait_for(asyncio.gather(*[one(c, p) for p in prompts]), 300)

    assert asyncio.run(main()) == [r.text for r in ref]


def test_load_generator_in_two_processes_gets_every_stream_whole(server):
    """bench_serving's load generator spread over two client processes (a closed loop of 4 clients): every
    request's timing comes back in request order, complete (its usage equals its own output length)."""
    from jkv.bench.http_load import run_load_in_processes

    reqs = [([1 + i, 2, 3], 2 + i % 5) for i in range(10)]
    timings, wall = run_load_in_processes(server.url, "tiny", reqs, concurrency=4, deadline_s=120, processes=2,
                                          api_key=API_KEY)  # fmt: skip
    assert [t.error for t in timings] == [None] * len(reqs)
    assert [t.tokens for t in timings] == [n for _, n in reqs]
    assert all(t.sent <= t.first <= t.end for t in timings) and wall > 0


BAD = [  # (body, what the message names)
    (b"{not json", "not valid JSON"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": "tiny", "prompt": 5}, "prompt"),
    ({"prompt": "hi"}, "'model' is required"),
    ({"model": "gpt-4", "prompt": "hi"}, "not served here"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": "tiny", "prompt": "hi", "n": 2, "best_of": 1}, "best_of"),
    ({"model": "tiny", "prompt": "", "max_tokens": 2}, "empty"),
    ({"model": "tiny", "prompt": [1, 2, 99999]}, "vocabulary"),
    ({"model": "tiny", "prompt": "hi " * 100, "max_tokens": 100}, "context"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 120, "n": 8}, "never fit"),
]


def test_every_bad_input_is_400_and_disturbs_no_other_request(server, client, model):
    ref = reference(model, PROMPTS[3], max_tokens=20)[0].text
    good = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=20, temperature=0, stream=True)
    for body, says in BAD:
        r = raw(server, "/v1/completions", body)
        err = r.json()["error"]
        assert r.status_code == 400 and says in err["message"] and err["type"] == "invalid_request_error", (body, err)
        assert err["message"].endswith((".", ")")), err
    assert "".join(c.choices[0].text for c in good) == ref


def test_api_key_body_limit_and_unknown_paths(server):
    r = raw(server, "/v1/completions", {"model": "tiny", "prompt": "hi"}, key=None)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    assert raw(server, "/v1/completions", {"model": "tiny", "prompt": "hi"}, key="wrong").status_code == 401
    r = raw(server, "/v1/completions", {"model": "tiny", "prompt": "x" * 5000})
    assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["error"]["message"]
    chunked = (b'{"model": "tiny", "prompt": "' + b"x" * 1000 for _ in range(5))  # no Content-Length: counted
    r = raw(server, "/v1/completions", chunked)
    assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.put(server.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_metrics_show_the_engine(server, client):
    shared_prefix = " ".join(PROMPTS * 3)  # several full blocks, so the second request hits the prefix cache
    for _ in range(2):
        client.completions.create(model="tiny", prompt=shared_prefix, max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    for name in ("jkv:num_requests_running", "jkv:num_requests_waiting", "jkv:num_requests_swapped",
                 "jkv:kv_cache_usage_perc", 'jkv:kv_blocks{state="free"}', 'jkv:kv_blocks{state="cached"}',
                 "jkv:kv_internal_fragmentation", 'jkv:num_preemptions_total{kind="swap"}', "jkv:swap_bytes_total",
                 'jkv:plan_bytes{term="kv_pool"}', "jkv:prefix_cache_hits_total", "jkv:xla_compilations_total"):  # fmt: skip
        assert name in values, name
    assert values["jkv:prompt_tokens_total"] > 0 and values["jkv:generation_tokens_total"] > 0
    assert values["jkv:prefix_cache_queries_total"] >= values["jkv:prefix_cache_hits_total"] > 0
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds"):  # fmt: skip
        assert values[f"jkv:{h}_count"] > 0, h
    assert values['jkv:kv_blocks{state="total"}'] == ENGINE["num_blocks"] - 1
