"""One HTTP generation call, from checked prompts to OpenAI responses: submit its engine requests, follow their
outputs (stopping them when the client goes away or the request timeout passes), and shape the results as
completions or chat completions, whole or as server-sent events.

A call with several prompts (completions) runs one engine request per prompt; choice `i * n + j` is sample j of
prompt i. Streamed chunks carry what is new in each sample since the last chunk: text the detokenizer may show
(never part of a stop string) and, with logprobs, the new tokens' entries.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi.sse import format_sse_event
from starlette.requests import Request

from jkv.request import RequestOutput
from jkv.sampling import SamplingParams
from jkv.serve import protocol as P
from jkv.serve.engine_loop import EngineDead, EngineLoop, NotReady, Overloaded, RequestStream

log = logging.getLogger("jkv.serve")

DISCONNECT_POLL_S = 1.0  # a non-streamed request checks for a vanished client this often
STARTING_RETRY_S = 5  # Retry-After while the engine warms up (warm-up takes seconds to minutes)


@dataclass
class Call:
    """One HTTP call's engine requests and how to answer it."""

    kind: str  # "completion" or "chat"
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    sampling: SamplingParams
    echo: bool = False
    logprobs: int | None = None  # completions: alternatives per token; chat: top_logprobs (logprobs=True)
    include_usage: bool = False
    call_id: str = ""
    created: int = 0
    streams: list[RequestStream] = field(default_factory=list)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


async def submit(loop: EngineLoop, call: Call) -> None:
    """Hand every prompt to the engine; on any refusal abort those already in and raise the client's error."""
    try:
        for i, ids in enumerate(call.prompts):
            rid = f"{call.call_id}-{i}"
            call.streams.append(await loop.submit(rid, ids, call.sampling, call.queue))
    except ValueError as err:
        abort_all(loop, call)
        raise P.RequestError(f"{err}" if len(call.prompts) == 1 else f"prompt {i}: {err}", "prompt") from None
    except NotReady as err:
        abort_all(loop, call)
        raise P.RequestError(str(err), None, 503, "server_starting", {"Retry-After": str(STARTING_RETRY_S)}) from None
    except Overloaded as err:
        abort_all(loop, call)
        raise P.RequestError(str(err), None, 503, "server_overloaded", {"Retry-After": "1"}) from None
    except EngineDead as err:
        abort_all(loop, call)
        raise P.RequestError(str(err), None, 503, "server_error") from None


def abort_all(loop: EngineLoop, call: Call) -> None:
    for s in call.streams:
        loop.abort(s.request_id)


class ClientGone(Exception):
    pass


async def outputs(loop: EngineLoop, call: Call, request: Request | None, timeout: float | None,
                  poll: float | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
    """(prompt index, output) as the engine reports them, until every request finished. `request` (non-streamed
    calls): polled for a disconnect, which aborts the requests and raises ClientGone. Past `timeout` seconds the
    requests are aborted and RequestError (504) is raised."""
    index = {s.request_id: i for i, s in enumerate(call.streams)}
    pending = set(index)
    clock = asyncio.get_running_loop().time
    deadline = None if timeout is None else clock() + timeout
    while pending:
        wait = poll if request is not None else None
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                abort_all(loop, call)
                raise P.RequestError(f"the request ran past the server's --request-timeout of {timeout:g} s and was "
                                     "stopped: ask for fewer tokens or retry when the server is less busy.",
                                     None, 504, "timeout")  # fmt: skip
            wait = left if wait is None else min(wait, left)
        try:  # no wait_for without a bound: it costs a task per output
            first = await (call.queue.get() if wait is None else asyncio.wait_for(call.queue.get(), wait))
        except TimeoutError:
            if request is not None and await request.is_disconnected():
                abort_all(loop, call)
                raise ClientGone() from None
            continue
        for item in _latest(first, call.queue):
            if isinstance(item, BaseException):
                raise P.RequestError(str(item), None, 503, "server_error")
            if item.request_id in pending:
                if item.finished:
                    pending.discard(item.request_id)
                yield index[item.request_id], item


def _latest(first, queue: asyncio.Queue) -> list:
    """`first` and whatever else is queued, keeping each request's latest output only. Every output carries its
    request's whole state so far, so a handler that fell behind (the server busy) sends one chunk for several
    engine rounds instead of one per round."""
    if queue.empty():
        return [first]
    latest: dict[str, RequestOutput] = {}
    items = [first]
    while not queue.empty():
        items.append(queue.get_nowait())
    for item in items:
        if isinstance(item, BaseException):
            return [*latest.values(), item]
        latest.pop(item.request_id, None)  # re-insert: the dict keeps arrival order of the latest outputs
        latest[item.request_id] = item
    return list(latest.values())


# Whole responses ------------------------------------------------------------------------------------------
async def respond(loop: EngineLoop, call: Call, request: Request, timeout: float | None, token_text) -> dict:
    final: dict[int, RequestOutput] = {}
    async for i, out in outputs(loop, call, request, timeout, DISCONNECT_POLL_S):
        if out.finished:
            final[i] = out
    choices, completion_tokens = [], 0
    for i in range(len(call.prompts)):
        out = final[i]
        if out.error is not None:
            raise P.RequestError(out.error, "prompt")
        for j, smp in enumerate(out.samples):
            completion_tokens += len(smp.token_ids)
            choices.append(_choice(call, i, j, out, smp, token_text))
    body = {"id": call.call_id, "object": "text_completion" if call.kind == "completion" else "chat.completion",
            "created": call.created, "model": call.model, "choices": choices,
            "usage": P.usage(sum(map(len, call.prompts)), completion_tokens)}  # fmt: skip
    return body


def _choice(call: Call, i: int, j: int, out: RequestOutput, smp, token_text) -> dict:
    index = i * call.sampling.n + j
    text = smp.text or ""
    reason = P.finish_reason(smp, out)
    if call.kind == "chat":
        choice = {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "stop_reason": smp.stop_reason, "logprobs": None}  # fmt: skip
        if call.logprobs is not None and smp.logprobs is not None:
            choice["logprobs"] = P.chat_logprobs(smp.token_ids, smp.logprobs, token_text, call.logprobs)
        return choice
    logprobs = None
    if call.logprobs is not None:
        tokens, entries = list(smp.token_ids), list(smp.logprobs or [])
        if call.echo:
            tokens, entries = call.prompts[i] + tokens, _prompt_entries(call, i, out) + entries
        logprobs = P.completion_logprobs(tokens, entries, token_text)
    if call.echo:
        text = _echo_text(call, i, token_text) + text
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason,
            "stop_reason": smp.stop_reason}  # fmt: skip


def _echo_text(call: Call, i: int, token_text) -> str:
    """Prompt i's text as the client sent it (or decoded, for token ids)."""
    text = call.prompt_texts[i]
    return text if text is not None else token_text.decode(call.prompts[i])


def _prompt_entries(call: Call, i: int, out: RequestOutput) -> list:
    return list(out.prompt_logprobs or [None] * len(call.prompts[i]))


# Server-sent events ---------------------------------------------------------------------------------------
@dataclass
class _Sent:
    text: int = 0
    tokens: int = 0
    started: bool = False
    done: bool = False


def sse(data) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data, separators=(",", ":")))


async def stream(loop: EngineLoop, call: Call, timeout: float | None, token_text) -> AsyncIterator[bytes]:
    """The call's chunks as server-sent events, ending with `data: [DONE]`; a client that goes away (the
    response is cancelled) has its requests aborted."""
    sent: dict[tuple[int, int], _Sent] = {}
    completion_tokens = 0
    try:
        async for i, out in outputs(loop, call, None, timeout):
            if out.error is not None:
                yield sse(P.error_body(out.error, param="prompt"))
                continue
            for j, smp in enumerate(out.samples):
                st = sent.setdefault((i, j), _Sent())
                chunk = _delta(call, i, j, out, smp, st, token_text)
                if chunk is not None:
                    yield sse(chunk)
            if out.finished:
                completion_tokens += sum(len(s.token_ids) for s in out.samples)
        if call.include_usage:
            yield sse({"id": call.call_id, "object": _chunk_kind(call), "created": call.created, "model": call.model,
                       "choices": [], "usage": P.usage(sum(map(len, call.prompts)), completion_tokens)})  # fmt: skip
    except P.RequestError as err:
        yield sse(P.error_body(err.message, err.kind, err.param, err.status))
    finally:
        if any(not s.done for s in sent.values()) or not sent:
            abort_all(loop, call)  # no-op for requests that finished
    yield sse("[DONE]")


def _chunk_kind(call: Call) -> str:
    return "text_completion" if call.kind == "completion" else "chat.completion.chunk"


def _delta(call: Call, i: int, j: int, out: RequestOutput, smp, st: _Sent, token_text) -> dict | None:
    """The chunk for what is new in sample j of prompt i (None when nothing is)."""
    text = smp.text or ""
    new_text = text[st.text :]
    new_tokens = smp.token_ids[st.tokens :]
    reason = P.finish_reason(smp, out) if out.finished or smp.finish_reason else None
    if st.done or (not new_text and not new_tokens and reason is None and st.started):
        return None
    entries = (smp.logprobs or [])[st.tokens : len(smp.token_ids)]
    first = not st.started
    st.text, st.tokens, st.started, st.done = len(text), len(smp.token_ids), True, reason is not None
    index = i * call.sampling.n + j
    base = {"id": call.call_id, "object": _chunk_kind(call), "created": call.created, "model": call.model}
    if call.kind == "chat":
        delta = {"content": new_text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        if call.logprobs is not None and entries:
            choice["logprobs"] = P.chat_logprobs(new_tokens, entries, token_text, call.logprobs)
        return base | {"choices": [choice]}
    tokens = list(new_tokens)
    if first and call.echo:
        new_text = _echo_text(call, i, token_text) + new_text
        if call.logprobs is not None:
            tokens, entries = call.prompts[i] + tokens, _prompt_entries(call, i, out) + list(entries)
    logprobs = P.completion_logprobs(tokens, entries, token_text) if call.logprobs is not None else None
    choice = {"index": index, "text": new_text, "logprobs": logprobs, "finish_reason": reason,
              "stop_reason": smp.stop_reason if reason else None}  # fmt: skip
    return base | {"choices": [choice]}
