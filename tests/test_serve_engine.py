"""The engine features `jkv serve` rests on, without a server: incremental detokenization equals a full decode,
stop strings end a sequence at the token completing them (on every scheduling path: multi-step, async, forks),
and logprobs / prompt logprobs equal the dense model's log-softmax. One small engine configuration, shared.
"""

from __future__ import annotations

import random
from pathlib import Path

import jax
import numpy as np
import pytest

import jkv
from jkv.detokenizer import IncrementalDetokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_gpt2"
ENGINE = {"num_blocks": 64, "block_size": 8, "max_num_seqs": 4, "max_num_batched_tokens": 32}


@pytest.fixture(scope="module")
def model():
    return jkv.load_model(str(FIXTURE))


@pytest.fixture(scope="module")
def tok(model):
    return jkv.get_tokenizer(model.source)


def test_incremental_text_equals_full_decode(tok):
    rng = random.Random(0)
    for _ in range(100):  # random ids: byte tokens split characters, so pieces wait for the rest of them
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        d = IncrementalDetokenizer(tok)
        seen = []
        for t in ids:
            d.feed(t)
            seen.append(d.text)
        d.flush()
        assert d.text == tok.tokenizer.decode(ids, skip_special_tokens=True)
        assert all(d.text.startswith(s) for s in seen)  # text only ever grows


class _DecodeOnly:
    """A tokenizer seen only through `decode`: the detokenizer's fallback path (differences of full decodes)."""

    def __init__(self, tok) -> None:
        self.decode = lambda ids: tok.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("source", ["gpt2", "llama"])
def test_streamed_and_batched_text_equal_full_decode_and_the_decode_path(tok, source):
    """The DecodeStream path, fed a token at a time or a round at a time (feed_many), gives the text the
    decode-difference path gives after every feed, and the full decode once flushed; on byte-level BPE (GPT-2)
    and on the Llama fixture's tokenizer, where random ids split characters."""
    if source == "llama":
        tok = jkv.get_tokenizer(str(Path(__file__).parent / "fixtures" / "hf_tiny_llama" / "llama"))
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        streamed, by_decode, batched = IncrementalDetokenizer(tok), IncrementalDetokenizer(_DecodeOnly(tok)), \
            IncrementalDetokenizer(tok)  # fmt: skip
        assert streamed._stream is not None and by_decode._stream is None
        for t in ids:
            streamed.feed(t)
            by_decode.feed(t)
            assert streamed.text == by_decode.text
        for k in range(0, len(ids), 8):
            before = batched.text
            batched.feed_many(ids[k : k + 8])
            assert batched.text.startswith(before)
        full = tok.tokenizer.decode(ids, skip_special_tokens=True)
        for d in (streamed, by_decode, batched):
            d.flush()
            assert d.text == full


def test_default_gpt2_tokenizer_keeps_multibyte_characters_whole():
    tok = jkv.get_tokenizer()  # GPT-2's byte-level BPE: "é" and emoji span several tokens
    text = "naïve café 🙂 done"
    d = IncrementalDetokenizer(tok)
    for t in tok.encode(text):
        d.feed(t)
        assert "\ufffd" not in d.text
    assert d.text == text


def test_stop_string_straddling_tokens_is_cut_and_held_back(tok):
    ids = tok.encode("one two three four")
    d = IncrementalDetokenizer(tok, ("o thr",))
    shown = []
    for t in ids:
        stopped = d.feed(t)
        shown.append(d.visible_text(False))
        if stopped:
            break
    assert d.text == "one tw" and d.stop_reason == "o thr"
    assert all(len(s) <= len("one tw") for s in shown)  # no part of the stop string was ever visible


@pytest.mark.parametrize("decode_steps,async_scheduling", [(1, False), (4, True)])
def test_stop_strings_end_generation_like_the_reference(model, tok, decode_steps, async_scheduling):
    prompt = tok.encode("Hello world")
    full = jkv.reference_generate(model, [prompt], max_tokens=20)[0]
    text = tok.decode(full)
    stop = text[8:11]
    want = text[: text.index(stop)]
    with jkv.Engine(model, decode_steps=decode_steps, async_scheduling=async_scheduling, **ENGINE) as eng:
        rid = eng.add_request(prompt, jkv.SamplingParams(max_tokens=20, stop=[stop], n=2, seed=1))
        other = eng.add_request(prompt, jkv.SamplingParams(max_tokens=20))
        out = eng.run()
    for s in out[rid].samples:  # greedy forks: both stop at the same token
        assert s.text == want and s.finish_reason == "stop" and s.stop_reason == stop
        k = len(s.token_ids)  # kept up to the token that completed the stop string
        assert s.token_ids == full[:k] and stop in tok.decode(full[:k]) and stop not in tok.decode(full[: k - 1])
    assert out[other].token_ids == full  # the request beside it ran to its length


def test_logprobs_and_prompt_logprobs_equal_dense_log_softmax(model, tok):
    prompt = tok.encode("The quick brown fox jumps")
    sampling = jkv.SamplingParams(max_tokens=5, temperature=0.8, seed=3, n=2, logprobs=4, prompt_logprobs=2)
    with jkv.Engine(model, decode_steps=4, **ENGINE) as eng:  # a 32-token chunk budget: the prompt spans chunks
        rid = eng.add_request(prompt, sampling)
        out = eng.run()[rid]
    logp = np.asarray(jax.nn.log_softmax(model.logits(prompt), axis=-1))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        e = out.prompt_logprobs[t]
        np.testing.assert_allclose(e.logprob, logp[t - 1, prompt[t]], atol=2e-4)
        np.testing.assert_allclose(e.top_logprobs, np.sort(logp[t - 1])[::-1][:2], atol=2e-4)
    for s in out.samples:  # sampled (not greedy): the logprobs are the model's, before temperature
        ids = prompt + s.token_ids
        lp = np.asarray(jax.nn.log_softmax(model.logits(ids), axis=-1))
        want = [lp[len(prompt) - 1 + i, t] for i, t in enumerate(s.token_ids)]
        np.testing.assert_allclose([e.logprob for e in s.logprobs], want, atol=2e-4)
        assert all(len(e.top_ids) == 4 and e.top_logprobs == sorted(e.top_logprobs, reverse=True) for e in s.logprobs)


def test_bad_logprobs_and_stop_values_are_refused():
    for bad, kind in [({"logprobs": 21}, ValueError), ({"prompt_logprobs": -1}, ValueError), ({"stop": [""]}, ValueError),
                      ({"stop": 5}, TypeError), ({"beam_width": 2, "stop": ["x"]}, ValueError)]:  # fmt: skip
        with pytest.raises(kind):
            jkv.SamplingParams(**bad)
