"""The FastAPI application: OpenAI-compatible routes over the scheduler.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions, GET /health
(:mod:`ft.server.routes`). Every error is an OpenAI-shaped JSON body with a 4xx/5xx status
(:mod:`ft.server.handlers`); malformed requests get 400 ``invalid_request_error`` with ``param`` naming the
field (the official client raises BadRequestError). A client that disconnects stops its generation,
streaming or not (:mod:`ft.server.exchange`). The middleware of :func:`ft.server.security.guard` wraps it all.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from ft.server.config import ServerConfig
from ft.server.handlers import add_error_handlers
from ft.server.routes import completions, models
from ft.server.security import guard
from ft.server.source import ModelSource
from ft.server.state import ServerState

log = logging.getLogger("ft.server")


def create_app(
    config: ServerConfig, source: ModelSource, *, on_fatal: Callable[[Exception], None] | None = None
) -> Any:
    """The ASGI application for ``config``; the worker starts (and the default model loads) at start-up."""
    state = ServerState.build(config, source)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        if config.default_model:
            info = state.directory.find(config.default_model)
            state.scheduler.preload(
                info, on_fatal or (lambda e: log.error("could not load %s: %s", info.id, e))
            )
        try:
            yield
        finally:
            state.scheduler.stop()

    app = FastAPI(title="ft serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.ft = state
    add_error_handlers(app)
    models.routes.add_to(app)
    completions.routes.add_to(app)
    outer = guard(app, config)
    outer.fastapi = app  # type: ignore[attr-defined]  # tests enumerate the routes of the real application
    return outer
