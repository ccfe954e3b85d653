"""The FastAPI application: OpenAI-compatible routes over the scheduler.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health.
Every error is an OpenAI-shaped JSON body with a 4xx/5xx status; malformed requests get 400/422.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
    chat_prompt,
    check_bias,
    text_prompt,
    token_budget,
)
from ft.server.pool import ModelPool
from ft.server.scheduler import Failed, Job, Scheduler, Started
from ft.server.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from ft.server.security import AccessLog, BearerAuth, BodyLimit
from ft.server.source import LoadedModel, ModelInfo, ModelSource

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


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """400 for a body that is not JSON, 422 for JSON with wrong fields; the message never echoes input values."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


def create_app(
    config: ServerConfig, source: ModelSource, *, on_fatal: Callable[[Exception], None] | None = None
) -> Any:
    """The ASGI application for ``config``; the worker starts (and the default model loads) at start-up."""
    directory = ModelDirectory(source)
    pool = ModelPool(source, config.max_models)
    scheduler = Scheduler(pool, config.max_queue)

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
        status, message = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
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
        return {
            "object": "list",
            "data": [
                {
                    "id": m.id,
                    "object": "model",
                    "created": m.created,
                    "owned_by": "ft",
                    "kind": m.kind,
                    **(
                        {"base": m.base, "run": m.run, "checkpoint": m.checkpoint}
                        if m.kind == "tuned"
                        else {}
                    ),
                }
                for m in models.values()
            ],
        }

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

    def sampling(req: _Sampling, prompt_len: int, lm: LoadedModel) -> SamplingParams:
        check_bias(lm, req.bias())
        return SamplingParams(
            max_tokens=token_budget(lm, prompt_len, req.token_limit(), config.max_tokens),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(req.stops()),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.bias(),
        )

    async def admit(
        request: Request, info: ModelInfo, plan: Callable[[LoadedModel], Any]
    ) -> tuple[Job, Started]:
        if pool.loading is not None:
            raise ApiError(
                503,
                f"model {pool.loading!r} is loading; retry in a few seconds",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": str(RETRY_AFTER_LOADING_S)},
            )
        job = Job(info, plan, asyncio.get_running_loop(), time.monotonic() + config.request_timeout)
        if not scheduler.submit(job):
            raise ApiError(
                429,
                f"the server is busy ({scheduler.pending} requests in progress or queued); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        first = await next_event(job)
        if isinstance(first, Failed):
            raise first.error
        assert isinstance(first, Started)
        return job, first

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

    async def run(
        request: Request,
        req: _Sampling,
        info: ModelInfo,
        plan: Callable[[LoadedModel], Any],
        chunk: Callable[[str | None, str | None], dict[str, Any]],
        whole: Callable[[str, str, dict[str, Any]], dict[str, Any]],
        opening: dict[str, Any] | None = None,
    ) -> Any:
        job, started = await admit(request, info, plan)
        if not req.stream:
            texts: list[str] = []
            try:
                while True:
                    ev = await next_event(job)
                    if isinstance(ev, Delta):
                        texts.append(ev.text)
                    elif isinstance(ev, Finished):
                        if ev.finish_reason == "timeout":
                            raise ApiError(
                                504,
                                f"the request took longer than {config.request_timeout:g}s",
                                type="timeout",
                                code="timeout",
                            )
                        usage = record(request, started, ev)
                        if config.log_prompts:
                            prompt_log.info("completion for %s: %r", started.model, "".join(texts))
                        return whole("".join(texts), ev.finish_reason, usage)
                    elif isinstance(ev, Failed):
                        raise ev.error
            finally:
                job.cancel()  # no-op when finished; stops the worker when this handler was cancelled

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
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
                        yield _sse(chunk(ev.text, None))
                    elif isinstance(ev, Finished):
                        usage = record(request, started, ev)
                        if ev.finish_reason == "timeout":
                            yield _sse(error_body("the request timed out", "timeout", "timeout"))
                            break
                        yield _sse(chunk(None, ev.finish_reason))
                        if include_usage:
                            yield _sse({**chunk(None, None), "choices": [], "usage": usage})
                        break
                    elif isinstance(ev, Failed):
                        yield _sse(ev.error.body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # the client went away or we are done: either way the worker may stop

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        info = pick_model(req.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        if config.log_prompts:
            prompt_log.info("chat for %s: %r", info.id, messages)

        def plan(lm: LoadedModel) -> tuple[list[int], SamplingParams]:
            prompt = chat_prompt(lm, messages)
            return prompt, sampling(req, len(prompt), lm)

        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(
            text: str | None, finish: str | None, delta: dict[str, Any] | None = None
        ) -> dict[str, Any]:
            delta = dict(delta or {})
            if text is not None:
                delta["content"] = text
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": info.id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }

        def whole(text: str, finish: str, usage: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": info.id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            }

        opening = chunk(None, None, {"role": "assistant", "content": ""})
        return await run(request, req, info, plan, chunk, whole, opening)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        info = pick_model(req.model)
        if config.log_prompts:
            prompt_log.info("completion prompt for %s: %r", info.id, req.prompt)

        def plan(lm: LoadedModel) -> tuple[list[int], SamplingParams]:
            prompt = text_prompt(lm, req.prompt)
            return prompt, sampling(req, len(prompt), lm)

        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": info.id,
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}],
            }

        def whole(text: str, finish: str, usage: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": info.id,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": usage,
            }

        return await run(request, req, info, plan, chunk, whole)

    # Outermost first when a request arrives: log, CORS, auth, body limit, then the routes.
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
    outer = AccessLog(wrapped)
    outer.fastapi = app  # tests enumerate the routes of the real application
    return outer


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
