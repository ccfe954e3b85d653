"""GET /health and the model listing: GET /v1/models, GET /v1/models/{id}."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse

from ft.server.routes import RouteGroup
from ft.server.shapes import model_entry
from ft.server.state import State

routes = RouteGroup()


@routes.get("/health")
async def health(state: State) -> JSONResponse:
    loading = state.pool.loading is not None
    body: dict[str, Any] = {"status": "loading" if loading else "ok", "queued": state.scheduler.pending}
    if state.config.api_key is None:  # with a key, /health is public: do not reveal what is loaded
        body["loaded"] = state.pool.loaded_ids()
        body["loading"] = state.pool.loading
    return JSONResponse(body, status_code=503 if loading else 200)


@routes.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    models = await asyncio.to_thread(state.directory.all)
    return {"object": "list", "data": [model_entry(m) for m in models.values()]}


@routes.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> dict[str, Any]:
    await asyncio.to_thread(state.directory.all)
    return model_entry(state.directory.find(model_id))
