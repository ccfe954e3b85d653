"""The FastAPI application: OpenAI-compatible routes over the scheduler.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions, GET /health.
Every error is an OpenAI-shaped JSON body with a 4xx/5xx status; malformed requests get 400
``invalid_request_error`` with ``param`` naming the field (the official client raises BadRequestError).
A client that disconnects stops its generation, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ft.server.config import ServerConfig
from ft.server.errors import ApiError, error_body
from ft.server.generation import (
    Delta,
    Finished,
    SamplingParams,
    TokenLogprob,
    chat_prompt,
    check_bias,
    text_prompt,
    token_budget,
)
from ft.server.pool import ModelPool
from ft.server.scheduler import Failed, Job, Scheduler, Started
from ft.server.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from ft.server.security import AccessLog, BearerAuth, BodyLimit, ClientLimits, HostGuard, clean
from ft.server.source import LoadedModel, ModelInfo, ModelSource, ToolSupport

log = logging.getLogger("ft.server")
prompt_log = logging.getLogger("ft.server.prompts")

MODELS_TTL_S = 1.0  # how long a listing of the workspace's models is reused
RETRY_AFTER_LOADING_S = 2


class ModelDirectory:
    """The servable models by id, re-read from the workspace at most once per MODELS_TTL_S."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._at = 0.0
        self._models: dict[str, ModelInfo] = {}

    def all(self) -> dict[str, ModelInfo]:
        now = time.monotonic()
        if now - self._at > MODELS_TTL_S:
            self._models = {m.id: m for m in self.source.models()}
            self._at = now
        return self._models

    def find(self, model_id: str) -> ModelInfo:
        models = self.all()
        if model_id not in models:
            shown = model_id if len(model_id) <= 80 else model_id[:80] + "…"
            raise ApiError(
                404,
                f"model {shown!r} not found; available: {', '.join(models) or '(none)'}",
                code="model_not_found",
                param="model",
            )
        return models[model_id]


_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def _param(loc: tuple[Any, ...]) -> str | None:
    """OpenAI's spelling of a field path, e.g. ``messages.[0].content`` (pydantic's union tags left out)."""
    parts: list[str] = []
    for x in loc:
        if x == "body" and not parts:
            continue
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif isinstance(x, str) and _FIELD.match(x) and x not in _TYPE_TAGS:
            parts.append(x)
        else:
            break
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> ApiError:
    """400 invalid_request_error naming the first bad field in ``param``; input values are never echoed."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "the request body is not valid JSON")
    if any(e.get("type") == "model_attributes_type" and not _param(e.get("loc", ())) for e in errors):
        return ApiError(400, "the request body must be a JSON object")
    parts = []
    for e in errors[:5]:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{_param(e.get('loc', ())) or 'body'}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return ApiError(400, "; ".join(parts) + more, param=_param(errors[0].get("loc", ())) if errors else None)


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**one(e.text, e.logprob), "top_logprobs": [one(t, lp) for _, t, lp in e.top]} for e in entries
        ],
        "refusal": None,
    }


def _completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for _, t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


class _ToolStream:
    """Streams a chat whose answer may hold tool calls, as the OpenAI API does.

    Text before a call marker (``<tool_call>``, ``[TOOL_CALLS]`` …) streams as content; from the marker on
    the text is held back, and at the end the calls are sent as ``tool_calls`` deltas (per call: id, type
    and name with empty arguments, then the arguments) with finish_reason ``tool_calls``. When no call
    can be read, the held text is sent as content after all.
    """

    def __init__(self, tools: ToolSupport, chunk: Callable[..., dict[str, Any]]):
        self.tools = tools
        self.chunk = chunk
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.holding = False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.holding:
            return ""
        rest = self.text[self.sent :]
        hits = [i for i in (rest.find(m) for m in self.tools.markers) if i != -1]
        if hits:
            self.holding = True
            out = rest[: min(hits)]
        else:  # hold back a tail that may be the start of a marker
            hold = 0
            for m in self.tools.markers:
                for k in range(min(len(m) - 1, len(rest)), hold, -1):
                    if rest.endswith(m[:k]):
                        hold = k
                        break
            out = rest[: len(rest) - hold]
        self.sent += len(out)
        return out

    def close(self, finish: str) -> tuple[list[dict[str, Any]], str]:
        _, calls, _ = self.tools.parse(self.text)
        if not calls:
            rest = self.text[self.sent :]
            return ([self.chunk(rest, None, [])] if rest else []), finish
        out = []
        for i, c in enumerate(calls):
            head = {
                "index": i,
                "id": c["id"],
                "type": "function",
                "function": {"name": c["function"]["name"], "arguments": ""},
            }
            out.append(self.chunk(None, None, [], {"tool_calls": [head]}))
            args = {"index": i, "function": {"arguments": c["function"]["arguments"]}}
            out.append(self.chunk(None, None, [], {"tool_calls": [args]}))
        return out, "tool_calls"


def _model_entry(m: ModelInfo) -> dict[str, Any]:
    return {
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "ft",
        "kind": m.kind,
        **({"base": m.base, "run": m.run, "checkpoint": m.checkpoint} if m.kind == "tuned" else {}),
    }


def create_app(
    config: ServerConfig, source: ModelSource, *, on_fatal: Callable[[Exception], None] | None = None
) -> Any:
    """The ASGI application for ``config``; the worker starts (and the default model loads) at start-up."""
    directory = ModelDirectory(source)
    pool = ModelPool(source, config.max_models)
    scheduler = Scheduler(pool, config.max_queue, config.max_batch, config.prefill_chunk)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        if config.default_model:
            info = directory.find(config.default_model)
            scheduler.preload(info, on_fatal or (lambda e: log.error("could not load %s: %s", info.id, e)))
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(
        title="ft serve",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    app.state.directory = directory

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", clean(request.method), clean(request.url.path))
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        loading = pool.loading is not None
        body: dict[str, Any] = {"status": "loading" if loading else "ok", "queued": scheduler.pending}
        if config.api_key is None:  # with a key, /health is public: do not reveal what is loaded
            body["loaded"] = pool.loaded_ids()
            body["loading"] = pool.loading
        return JSONResponse(body, status_code=503 if loading else 200)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        models = await asyncio.to_thread(directory.all)
        return {"object": "list", "data": [_model_entry(m) for m in models.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        await asyncio.to_thread(directory.all)
        return _model_entry(directory.find(model_id))

    def pick_model(name: str | None) -> ModelInfo:
        if name is None:
            if config.default_model:
                name = config.default_model
            else:
                listed = directory.all()
                if len(listed) != 1:
                    raise ApiError(
                        400, f"say which model: one of {', '.join(listed) or '(none)'}", param="model"
                    )
                name = next(iter(listed))
        return directory.find(name)

    def sampling(
        req: _Sampling, prompt_len: int, lm: LoadedModel, default_limit: int | None = None
    ) -> SamplingParams:
        check_bias(lm, req.bias())
        logprobs, top = req.logprob_settings()
        limit = req.token_limit()
        return SamplingParams(
            max_tokens=token_budget(
                lm, prompt_len, default_limit if limit is None else limit, config.max_tokens
            ),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(req.stops()),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.bias(),
            logprobs=logprobs,
            top_logprobs=top,
        )

    def submit(info: ModelInfo, plan: Callable[[LoadedModel], Any]) -> Job:
        if pool.loading is not None:
            raise ApiError(
                503,
                f"model {pool.loading!r} is loading; retry in a few seconds",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": str(RETRY_AFTER_LOADING_S)},
            )
        base = directory.find(info.base) if info.kind == "tuned" and info.base else None
        job = Job(info, plan, asyncio.get_running_loop(), time.monotonic() + config.request_timeout, base)
        if not scheduler.submit(job):
            raise ApiError(
                429,
                f"the server is busy ({scheduler.pending} requests in progress or queued); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        return job

    async def started(job: Job) -> Started:
        first = await next_event(job)
        if isinstance(first, Failed):
            raise first.error
        assert isinstance(first, Started)
        return first

    async def next_event(job: Job) -> Any:
        remaining = job.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(job.events.get(), timeout=max(remaining, 0.001) + 1.0)
        except TimeoutError:
            job.cancel("timeout")
            raise ApiError(
                504,
                f"the request took longer than {config.request_timeout:g}s",
                type="timeout",
                code="timeout",
            ) from None

    def record(request: Request, started: Started, fin: Finished) -> dict[str, Any]:
        usage = {
            "prompt_tokens": fin.prompt_tokens,
            "completion_tokens": fin.completion_tokens,
            "total_tokens": fin.prompt_tokens + fin.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
        }
        request.state.ft_usage = {
            "model": started.model,
            "prompt_tokens": fin.prompt_tokens,
            "completion_tokens": fin.completion_tokens,
            "cached_tokens": fin.cached_tokens,
            "ttft_s": fin.ttft_s,
            "tps": fin.generation_tps,
            "finish_reason": fin.finish_reason,
        }
        return usage

    async def watch_disconnect(request: Request, job: Job) -> None:
        """Cancel ``job`` when the client goes away (the body is read: the next message is the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel("cancelled")
                return

    async def run(
        request: Request,
        req: _Sampling,
        info: ModelInfo,
        plan: Callable[[LoadedModel], Any],
        chunk: Callable[[str | None, str | None, list[TokenLogprob]], dict[str, Any]],
        whole: Callable[[str, str, dict[str, Any], list[TokenLogprob] | None], dict[str, Any]],
        opening: dict[str, Any] | None = None,
        make_filter: Callable[[], Any] | None = None,
    ) -> Any:
        job = submit(info, plan)
        # Waiting for the worker (and, without streaming, for the whole answer): a client that leaves
        # meanwhile cancels the job. A stream is watched by the streaming response itself later.
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            start = await started(job)
        except BaseException:
            job.cancel()
            watcher.cancel()
            raise
        if req.stream:
            watcher.cancel()
        want_logprobs = req.logprob_settings()[0]
        if not req.stream:
            texts: list[str] = []
            entries: list[TokenLogprob] = []
            try:
                while True:
                    ev = await next_event(job)
                    if isinstance(ev, Delta):
                        texts.append(ev.text)
                        entries += ev.logprobs
                    elif isinstance(ev, Finished):
                        if ev.finish_reason == "timeout":
                            raise ApiError(
                                504,
                                f"the request took longer than {config.request_timeout:g}s",
                                type="timeout",
                                code="timeout",
                            )
                        usage = record(request, start, ev)
                        if ev.finish_reason == "cancelled":  # the client left: nobody reads this answer
                            return JSONResponse(
                                error_body(
                                    "the client closed the request", "invalid_request_error", "cancelled"
                                ),
                                status_code=499,
                            )
                        if config.log_prompts:
                            prompt_log.info("completion for %s: %r", start.model, "".join(texts))
                        return whole(
                            "".join(texts), ev.finish_reason, usage, entries if want_logprobs else None
                        )
                    elif isinstance(ev, Failed):
                        raise ev.error
            finally:
                job.cancel()  # no-op when finished; stops the worker when this handler was cancelled
                watcher.cancel()

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            sent = 0
            done = False
            filt = make_filter() if make_filter is not None else None
            try:
                if opening is not None:
                    yield _sse(opening)
                while True:
                    try:
                        ev = await next_event(job)
                    except ApiError as e:
                        yield _sse(e.body())
                        break
                    if isinstance(ev, Delta):
                        sent += ev.tokens
                        text = filt.feed(ev.text) if filt is not None else ev.text
                        entries = ev.logprobs if want_logprobs else []
                        if text or entries or filt is None:
                            yield _sse(chunk(text, None, entries))
                    elif isinstance(ev, Finished):
                        done = True
                        usage = record(request, start, ev)
                        if ev.finish_reason == "timeout":
                            yield _sse(error_body("the request timed out", "timeout", "timeout"))
                            break
                        finish = ev.finish_reason
                        if filt is not None:
                            extra, finish = filt.close(finish)
                            for piece in extra:
                                yield _sse(piece)
                        yield _sse(chunk(None, finish, []))
                        if include_usage:
                            yield _sse({**chunk(None, None, []), "choices": [], "usage": usage})
                        break
                    elif isinstance(ev, Failed):
                        done = True
                        yield _sse(ev.error.body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # the client went away or we are done: either way the worker may stop
                if not done:
                    request.state.ft_usage = {
                        "model": start.model,
                        "prompt_tokens": start.prompt_tokens,
                        "completion_tokens": sent,
                        "cached_tokens": 0,
                        "ttft_s": 0.0,
                        "tps": 0.0,
                        "finish_reason": "aborted",
                    }
                    log.info("%s: stream aborted by the client after %d completion tokens", start.model, sent)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        info = pick_model(req.model)
        with_tools = req.uses_tools()
        messages = (
            req.openai_messages()
            if with_tools
            else [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages
            ]
        )
        tools = req.active_tools()
        if config.log_prompts:
            prompt_log.info("chat for %s: %r tools: %r", info.id, messages, tools)
        parser: list[ToolSupport] = []  # set by plan() on the worker when the answer may hold tool calls

        def plan(lm: LoadedModel) -> tuple[list[int], SamplingParams]:
            if with_tools:
                if lm.tools is None:
                    raise ApiError(
                        400,
                        f"model {lm.info.id!r} has no chat template, so it cannot be given tools",
                        code="tools_unsupported",
                        param="tools",
                    )
                try:
                    prompt = lm.tools.render(messages, tools)
                except ValueError as e:
                    raise ApiError(400, f"tool conversation refused: {e}", param="messages") from None
                if tools:
                    parser.append(lm.tools)
            else:
                prompt = chat_prompt(lm, messages)
            return prompt, sampling(req, len(prompt), lm, config.max_tokens_default)

        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(
            text: str | None,
            finish: str | None,
            entries: list[TokenLogprob],
            delta: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            delta = dict(delta or {})
            if text is not None:
                delta["content"] = text
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": info.id,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": finish,
                        "logprobs": _chat_logprobs(entries) if entries else None,
                    }
                ],
            }

        def whole(
            text: str, finish: str, usage: dict[str, Any], entries: list[TokenLogprob] | None
        ) -> dict[str, Any]:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if parser:
                content, calls, _ = parser[0].parse(text)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    finish = "tool_calls"
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": info.id,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": finish,
                        "logprobs": None if entries is None else _chat_logprobs(entries),
                    }
                ],
                "usage": usage,
            }

        opening = chunk(None, None, [], {"role": "assistant", "content": ""})

        def make_filter() -> _ToolStream | None:
            return _ToolStream(parser[0], chunk) if parser else None

        return await run(request, req, info, plan, chunk, whole, opening, make_filter if tools else None)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        info = pick_model(req.model)
        if config.log_prompts:
            prompt_log.info("completion prompt for %s: %r", info.id, req.prompt)

        def plan(lm: LoadedModel) -> tuple[list[int], SamplingParams]:
            prompt = text_prompt(lm, req.prompt)
            return prompt, sampling(req, len(prompt), lm)

        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        offset = [0]

        def chunk(text: str | None, finish: str | None, entries: list[TokenLogprob]) -> dict[str, Any]:
            lp = _completion_logprobs(entries, offset[0]) if entries else None
            offset[0] += len(text or "")
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": info.id,
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": lp}],
            }

        def whole(
            text: str, finish: str, usage: dict[str, Any], entries: list[TokenLogprob] | None
        ) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": info.id,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "finish_reason": finish,
                        "logprobs": None if entries is None else _completion_logprobs(entries, 0),
                    }
                ],
                "usage": usage,
            }

        return await run(request, req, info, plan, chunk, whole)

    # Outermost first when a request arrives: log, Host check (no key), per-client limit, CORS, auth,
    # body limit, then the routes.
    wrapped: Any = BodyLimit(app, config.max_body_bytes)
    if config.api_key is not None:
        wrapped = BearerAuth(wrapped, config.api_key.get_secret_value())
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        wrapped = CORSMiddleware(
            wrapped,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    wrapped = ClientLimits(wrapped, config.max_client_requests)
    if config.api_key is None:
        wrapped = HostGuard(wrapped)
    outer = AccessLog(wrapped)
    outer.fastapi = app  # type: ignore[attr-defined]  # tests enumerate the routes of the real application
    return outer


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
