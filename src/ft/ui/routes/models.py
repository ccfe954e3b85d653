"""Models: the workspace's and the catalog's, a search over both, the Hub search, one model's info, pull."""

from __future__ import annotations

from typing import Any

from fastapi import Query

from ft.errors import ErrorCode, FtError
from ft.server.routes import RouteGroup
from ft.services import models as models_svc
from ft.ui.jobs import Job
from ft.ui.routes import name_arg
from ft.ui.schemas import PullStart
from ft.ui.state import State
from ft.workspace import validate_name

routes = RouteGroup()


@routes.get("/api/models")
def models(state: State) -> models_svc.ModelList:
    return models_svc.list_models(state.ws)


@routes.get("/api/models/search")
def models_search(state: State, q: str = Query("", max_length=200)) -> models_svc.ModelList:
    """Workspace models and catalog entries whose name, source or description contain ``q``."""
    found = models_svc.list_models(state.ws)
    needle = q.lower()

    def hit(*texts: Any) -> bool:
        return any(needle in str(t or "").lower() for t in texts)

    return models_svc.ModelList(
        models=[m for m in found.models if hit(m.name, m.source, m.architecture)],
        catalog=[c for c in found.catalog if hit(c.name, c.source, c.description, c.architecture)],
    )


@routes.get("/api/models/hub")
def models_hub(q: str = Query(..., min_length=1, max_length=200)) -> models_svc.HubSearch:
    """Hugging Face model repositories matching ``q`` when the Hub is reachable (else ``error`` says why)."""
    return models_svc.search_hub(q)


@routes.get("/api/models/{name}")
def model_info(name: str, state: State) -> models_svc.ModelInfo:
    """`ft models info NAME`: files, and whether training it with the current train.yml fits in memory."""
    return models_svc.info(state.ws, validate_name(name, "model"))


@routes.post("/api/models/pull")
def models_pull(body: PullStart, state: State) -> Job:
    args = ["models", "pull", body.source]
    args += name_arg("--name", body.name, "model name")
    if body.source.startswith("-"):
        raise FtError(ErrorCode.USAGE, "a source cannot start with '-'", None)
    return state.queue.submit("pull", args)
