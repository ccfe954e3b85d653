"""The page: GET / (index.html), GET /static/{name}, GET /health (open without the key)."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse

from ft.errors import ErrorCode, FtError
from ft.server.routes import RouteGroup
from ft.ui.schemas import Health
from ft.ui.state import State
from ft.workspace import validate_name

STATIC = Path(__file__).parent.parent / "static"

routes = RouteGroup()


@routes.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


@routes.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    validate_name(name, "file")
    path = STATIC / name
    if not path.is_file():
        raise FtError(ErrorCode.NOT_FOUND, f"no file {name}", None)
    return FileResponse(path, headers={"Cache-Control": "no-store"})


@routes.get("/health")
async def health(state: State) -> Health:
    return Health(workspace=state.ws.root.name, auth=state.config.api_key is not None)
