"""The OpenAI wire format `jkv serve` speaks: request bodies (pydantic models, strictly typed), their translation
into `jkv.SamplingParams`, the OpenAI error object, and the response pieces built from `RequestOutput`s.

Field names and defaults follow OpenAI's completions and chat completions APIs, plus vLLM's extensions users rely
on (`top_k`, `stop_token_ids`, `ignore_eos`, `use_beam_search`, `length_penalty`). Anything a client can get wrong
raises `RequestError` with one sentence that names the field and says what to send.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jkv.request import RequestOutput, SampleOutput, TokenLogprobs
from jkv.sampling import MAX_LOGPROBS, SamplingParams

Prompt = str | list[str] | list[int] | list[list[int]]


class RequestError(Exception):
    """A client's mistake: answered with an OpenAI error object and `status` (400 unless said)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.headers = message, param, status, kind, headers


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: int = 400) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Sampling(BaseModel):
    """Fields completions and chat completions share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: Prompt
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


# Defaults of OpenAI's API where jkv's differ.
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default
DEFAULT_TEMPERATURE = 1.0


def sampling_params(req: _Sampling, *, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                    best_of: int | None, eos_token_id: int | None, context: int, prompt_len: int) -> SamplingParams:  # fmt: skip
    """The engine's `SamplingParams` for a request; RequestError naming the field for any bad value.

    max_tokens None: what the context leaves after the prompt (chat), or OpenAI's 16 (completions, passed in).
    best_of > n, or use_beam_search: beam search of width best_of (or n) returning the n best beams.
    """
    if req.presence_penalty or req.frequency_penalty:
        raise RequestError("presence_penalty and frequency_penalty are not supported: leave them at 0.", "presence_penalty")
    if max_tokens is None:
        max_tokens = max(1, context - prompt_len)
    if max_tokens < 1:
        raise RequestError(f"max_tokens={max_tokens} must be at least 1: ask for one token or more.", "max_tokens")
    if req.n < 1:
        raise RequestError(f"n={req.n} must be at least 1.", "n")
    beam_width = 1
    if best_of is not None:
        if best_of < req.n:
            raise RequestError(f"best_of={best_of} must be at least n={req.n}.", "best_of")
        if best_of > req.n or req.use_beam_search:
            beam_width = best_of
    elif req.use_beam_search:
        beam_width = max(req.n, 2)
    if beam_width > 1 and req.stream:
        raise RequestError("best_of / beam search results come at the end: send stream=false with them.", "stream")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stop_ids = list(req.stop_token_ids or [])
    if eos_token_id is not None and not req.ignore_eos:
        stop_ids.append(eos_token_id)
    fields = {
        "max_tokens": max_tokens, "temperature": DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p, "top_k": 0 if req.top_k in (None, -1) else req.top_k,
        "seed": req.seed, "stop_token_ids": tuple(stop_ids), "n": req.n, "beam_width": beam_width,
        "length_penalty": req.length_penalty, "ignore_eos": req.ignore_eos, "stop": tuple(stop),
        "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
    }  # fmt: skip
    try:
        return SamplingParams(**fields)
    except (TypeError, ValueError) as err:
        msg = str(err)
        param = msg.split("=", 1)[0].split(" ", 1)[0] if "=" in msg.split(" ", 1)[0] else None
        if beam_width > 1 and "beam" in msg:
            param = "best_of"
        raise RequestError(msg, param) from None


def check_logprobs(value: int | None, param: str) -> int | None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(f"{param}={value} must be between 0 and {MAX_LOGPROBS}.", param)
    return value


def prompt_list(prompt: Prompt) -> list[str | list[int]]:
    """The request's prompts: one string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt is empty: send a string, a list of strings or a list of token ids.", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        return list(prompt)
    raise RequestError("prompt mixes strings, token ids and lists: send one kind.", "prompt")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def finish_reason(sample: SampleOutput, out: RequestOutput) -> str | None:
    """OpenAI's finish_reason: 'stop' (a stop token or string), 'length', or 'abort' (the server stopped it)."""
    reason = sample.finish_reason or (out.finish_reason if out.finished else None)
    if reason == "aborted":
        return "abort"
    return reason


class TokenText:
    """Each token's own text for logprobs (a token ending inside a character shows U+FFFD, as in vLLM)."""

    def __init__(self, tokenizer) -> None:
        self._decode = tokenizer.decode
        self._cache: dict[int, str] = {}

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self._decode([token])
        return text


def completion_logprobs(tokens: list[int], entries: list[TokenLogprobs | None], token_text: TokenText,
                        offset: int = 0) -> dict:  # fmt: skip
    """OpenAI's completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries):
        text = token_text(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry.logprob)
        top = {token_text(t): lp for t, lp in zip(entry.top_ids, entry.top_logprobs)}
        top.setdefault(text, entry.logprob)
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokens: list[int], entries: list[TokenLogprobs], token_text: TokenText, top: int) -> dict:
    """OpenAI's chat `logprobs` object: content = per token {token, logprob, bytes, top_logprobs}."""
    content = []
    for token, entry in zip(tokens, entries):
        text = token_text(token)
        alts = [{"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())}
                for t, lp in list(zip(entry.top_ids, entry.top_logprobs))[:top]]  # fmt: skip
        content.append({"token": text, "logprob": entry.logprob, "bytes": list(text.encode()), "top_logprobs": alts})
    return {"content": content}


def now() -> int:
    return int(time.time())


ObjectKind = Literal["text_completion", "chat.completion", "chat.completion.chunk"]
