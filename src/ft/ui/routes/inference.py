"""POST /api/inference/generate: one chat completion through the playground's `ft serve` application."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ft.errors import ErrorCode, FtError
from ft.server.routes import RouteGroup
from ft.ui.state import State

routes = RouteGroup()


@routes.post("/api/inference/generate")
async def generate(request: Request, state: State) -> Any:
    """An OpenAI chat completion (the body and answer of POST /serve/v1/chat/completions), not streamed."""
    inner = state.playground.app
    if inner is None:
        raise FtError(ErrorCode.NOT_FOUND, "no model to chat with in this workspace", "ft models pull")
    import httpx

    body = await request.json()
    if not isinstance(body, dict):
        raise FtError(ErrorCode.USAGE, "the body must be a JSON object (an OpenAI chat request)", None)
    body["stream"] = False
    body.setdefault("model", state.playground.default_model)
    transport = httpx.ASGITransport(app=inner.fastapi)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        r = await client.post("/v1/chat/completions", json=body, timeout=600)
    return JSONResponse(r.json(), status_code=r.status_code)
