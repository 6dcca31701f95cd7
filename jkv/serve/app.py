"""The FastAPI app of `jkv serve`: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, plus
`/health` and `/metrics` (Prometheus).

Every error a client can cause is an OpenAI error object with one sentence saying what to do: 400 for bad input
(malformed JSON, wrong types, an unknown model, bad sampling values, a prompt the context or the pool can never
hold), 401 without the API key, 413 for a body over the limit, 503 with Retry-After while the engine warms up
(`/health` says "starting" until then), when the waiting queue is full or when the server is draining, 504 past
the request timeout. Handlers only validate, tokenize and await their requests' outputs; the engine runs on its
own process by default (jkv.serve.engine_process) or, with --engine-thread, on a thread (jkv.serve.engine_loop).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from jkv.serve import generation as G
from jkv.serve import protocol as P
from jkv.serve.chat import ChatTemplate, message_dicts
from jkv.serve.engine_loop import EngineLoop


@dataclass
class ServerState:
    loop: EngineLoop  # or an EngineProcess (the engine in its own process, the default): the same interface
    tokenizer: object
    model_name: str
    context: int  # prompt + output tokens a request may take
    vocab_size: int
    api_key: str | None = None
    chat_template: ChatTemplate | None = None
    request_timeout: float | None = None
    max_body_bytes: int = 1 << 20


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: dict | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(P.error_body(message, kind, param, status), status_code=status, headers=headers)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One sentence for pydantic's first complaint about a body."""
    first = err.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON: send a JSON object.", None
    if not loc:
        return f"the request body is not a JSON object of this endpoint's fields ({first.get('msg')}): send one.", None
    field = loc[0]
    if first.get("type") == "missing":
        return f"'{field}' is required: add it to the request.", field
    where = ".".join(loc)
    return f"'{where}' is invalid ({first.get('msg')}, got {first.get('input')!r}): fix that field.", field


class _ContentLengthLimit:
    """Answer a body announced over the limit with an OpenAI error object before reading it (Starlette's
    `RequestBodyLimitMiddleware` inside it stops an unannounced, chunked body that grows past it, in plain text)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.limit:
                message = (f"the request body is over the server's limit of {self.limit} bytes: send a smaller one."
                           if length.isdigit() else "the Content-Length header is not a number: send a valid one.")  # fmt: skip
                status = 413 if length.isdigit() else 400
                return await _error(status, message)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="jkv serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jkv = state
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=state.max_body_bytes)
    app.add_middleware(_ContentLengthLimit, limit=state.max_body_bytes)  # outermost
    token_text = P.TokenText(state.tokenizer)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        state.loop.count_rejected("400")
        return _error(400, message, param=param)

    @app.exception_handler(P.RequestError)
    async def _request_error(request: Request, err: P.RequestError):
        state.loop.count_rejected(str(err.status))
        return _error(err.status, err.message, err.kind, err.param, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        messages = {404: f"there is no {request.url.path}: use /v1/completions, /v1/chat/completions or /v1/models.",
                    405: f"{request.method} is not allowed on {request.url.path}: see OpenAI's API for the method.",
                    413: f"the request body is over the server's limit of {state.max_body_bytes} bytes: send a "
                         "smaller one."}  # fmt: skip
        message = messages.get(err.status_code, f"{err.detail}.")
        return _error(err.status_code, message, headers=getattr(err, "headers", None))

    async def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
            raise P.RequestError("a valid API key is required: send the header 'Authorization: Bearer <key>'.",
                                 None, 401, "authentication_error")  # fmt: skip

    def check_model(name: str) -> None:
        if name != state.model_name:
            raise P.RequestError(f"model '{name}' is not served here: use '{state.model_name}' (see /v1/models).",
                                 "model")

    def tokenize(prompt: str | list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return state.tokenizer.encode(prompt), prompt
        return list(prompt), None

    @app.get("/health")
    async def health():
        loop = state.loop
        if not loop.alive:
            return _error(503, loop.error or "the engine loop is not running: restart the server.", "server_error")
        if not loop.ready:  # warming up: a readiness probe sees 503 until the engine is warm
            done, total = loop.warmup_progress or (0, None)
            return JSONResponse({"status": "starting", "message": loop.starting_message(), "shapes_done": done,
                                 "shapes_total": total}, status_code=503)  # fmt: skip
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():  # every metric lives with the engine loop (its process's, with the engine in a process)
        return Response(await state.loop.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": P.now(),
                                            "owned_by": "jkv", "max_model_len": state.context}]}  # fmt: skip

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: P.CompletionRequest, request: Request):
        check_model(body.model)
        if body.suffix:
            raise P.RequestError("suffix is not supported: put the text in the prompt.", "suffix")
        logprobs = P.check_logprobs(body.logprobs, "logprobs")
        pairs = [tokenize(p) for p in P.prompt_list(body.prompt)]
        prompts = [ids for ids, _ in pairs]
        max_tokens = P.DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        sampling = P.sampling_params(
            body, max_tokens=max_tokens, logprobs=logprobs, best_of=body.best_of,
            prompt_logprobs=logprobs if body.echo and logprobs is not None else None,
            eos_token_id=getattr(state.tokenizer, "eos_token_id", None), context=state.context,
            prompt_len=max(map(len, prompts)),
        )  # fmt: skip
        call = G.Call("completion", body.model, prompts, [t for _, t in pairs], sampling, echo=body.echo,
                      logprobs=logprobs, include_usage=_include_usage(body), call_id=P.new_id("cmpl"),
                      created=P.now())  # fmt: skip
        return await _run(call, body.stream, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        check_model(body.model)
        if state.chat_template is None:
            raise P.RequestError(f"model '{state.model_name}' has no chat template (tokenizer_config.json has no "
                                 "chat_template): use /v1/completions, or start the server with --chat-template "
                                 "FILE.", "messages")  # fmt: skip
        top = P.check_logprobs(body.top_logprobs, "top_logprobs")
        if top is not None and not body.logprobs:
            raise P.RequestError("top_logprobs needs logprobs=true: set it or drop top_logprobs.", "top_logprobs")
        text = state.chat_template.render(message_dicts(body.messages), body.add_generation_prompt)
        ids = state.tokenizer.encode(text, add_special_tokens=False)  # the template wrote the BOS it wants
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (top or 0) if body.logprobs else None
        sampling = P.sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=None,
                                     best_of=None, eos_token_id=getattr(state.tokenizer, "eos_token_id", None),
                                     context=state.context, prompt_len=len(ids))  # fmt: skip
        call = G.Call("chat", body.model, [ids], [text], sampling, logprobs=logprobs,
                      include_usage=_include_usage(body), call_id=P.new_id("chatcmpl"), created=P.now())  # fmt: skip
        return await _run(call, body.stream, request)

    async def _run(call: G.Call, streaming: bool, request: Request):
        await G.submit(state.loop, call)
        if streaming:
            return EventSourceResponse(G.stream(state.loop, call, state.request_timeout, token_text))
        try:
            return await G.respond(state.loop, call, request, state.request_timeout, token_text)
        except G.ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            G.abort_all(state.loop, call)  # no-op for finished requests; stops them if the handler was cancelled

    return app


def _include_usage(body) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.get("include_usage"))
