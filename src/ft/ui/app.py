"""`ft ui`: the dashboard's FastAPI application: a REST API over the services, and the static page.

Every /api route (:mod:`ft.ui.routes`) returns a service's pydantic result (the model `ft ... --json`
prints), or a job of the queue (:mod:`ft.ui.jobs`) for long work (train, prepare, evaluate, export, pull),
which runs as an `ft` subprocess. Chat goes to the `ft serve` application (:func:`ft.server.app.create_app`),
mounted at /serve, so the playground and POST /api/inference/generate use the one generator of `ft serve`.

Safety: the same rule as `ft serve` (:mod:`ft.server.security`): on loopback without a key, only requests
whose Host names this machine (DNS rebinding); with ``serve_api_key`` every route but /health and the page's
static files needs ``Authorization: Bearer <key>`` (the page asks for the key and keeps it in the tab's
sessionStorage; there is no cookie, so another site cannot make a browser send it). Request bodies are
size-limited (:class:`ft.server.security.BodyLimit`: 413 before the route runs).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ft.errors import ErrorCode, FtError
from ft.server.security import BearerAuth, BodyLimit, HostGuard
from ft.ui.jobs import JobQueue
from ft.ui.routes import config, datasets, inference, jobs, models, page, results, runs
from ft.ui.state import Playground, UiConfig, UiState
from ft.workspace import Workspace

__all__ = ["UiConfig", "create_app"]

log = logging.getLogger("ft.ui")
PUBLIC = ("/", "/health", "/favicon.ico")
ROUTES = (page, runs, jobs, models, datasets, config, results, inference)

_STATUS = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.NAME_INVALID: 400,
    ErrorCode.USAGE: 400,
    ErrorCode.CONFIG_INVALID: 422,
}


async def _ft_error(request: Request, exc: FtError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=_STATUS.get(exc.code, 400))


def create_app(ws: Workspace, config: UiConfig, queue: JobQueue | None = None) -> Any:
    state = UiState(ws, config, queue or JobQueue(ws, max_training=config.max_training))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.queue.start()
        async with AsyncExitStack() as stack:
            if config.serve_chat:
                await _start_playground(state, stack)
            try:
                yield
            finally:
                state.queue.close()

    app = FastAPI(
        title="ft ui", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json", lifespan=lifespan
    )
    app.state.ui = state
    app.exception_handler(FtError)(_ft_error)
    for module in ROUTES:
        module.routes.add_to(app)

    api: Any = BodyLimit(app, config.max_upload_bytes)
    if config.api_key is not None:
        api = BearerAuth(api, config.api_key.get_secret_value())
    outer: Any = _Public(_Mount(api, state.playground), app)
    if config.api_key is None:
        outer = HostGuard(outer)
    outer.fastapi = app
    outer.queue = state.queue
    return outer


class _Public:
    """Routes the page's static files and /health around the API key check (they hold no data)."""

    def __init__(self, guarded: Any, open_app: Any):
        self.guarded, self.open_app = guarded, open_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path in PUBLIC or path.startswith("/static/")):
            return await self.open_app(scope, receive, send)
        return await self.guarded(scope, receive, send)


class _Mount:
    """/serve/... goes to `ft serve`'s application (its own key check and limits), the rest to the API."""

    def __init__(self, api: Any, playground: Playground):
        self.api, self.playground = api, playground

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/serve/"):
            inner = self.playground.app
            if inner is not None:
                scope = dict(scope, path=path[len("/serve") :], raw_path=None)
                return await inner(scope, receive, send)
        return await self.api(scope, receive, send)


async def _start_playground(state: UiState, stack: AsyncExitStack) -> None:
    """Start `ft serve`'s application over this workspace's models (nothing loaded until asked) for the
    lifetime of ``stack``, with the model `ft serve` would pick by default; none when there is no model."""
    from ft.server.app import create_app as create_serve_app
    from ft.services import serving

    try:
        server_config, source, info = serving.prepare(
            state.ws, serving.ServeOptions(host=state.config.host, max_models=2)
        )
    except FtError as e:
        log.info("playground off: %s", e.message)
        return
    server_config = server_config.model_copy(update={"default_model": None, "api_key": state.config.api_key})
    inner = create_serve_app(server_config, source)
    await stack.enter_async_context(inner.fastapi.router.lifespan_context(inner.fastapi))
    state.playground.app, state.playground.default_model = inner, info.default_model
