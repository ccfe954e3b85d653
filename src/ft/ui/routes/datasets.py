"""Datasets: list, info, records, remove, upload a file into the workspace, prepare (a job)."""

from __future__ import annotations

import re

from fastapi import Query, Request

from ft.errors import ErrorCode, FtError
from ft.server.routes import RouteGroup
from ft.services import dataset_inspect as dataset_inspect_svc
from ft.services import datasets as datasets_svc
from ft.ui.jobs import Job
from ft.ui.routes import flag, name_arg
from ft.ui.schemas import PrepareStart, UploadResult
from ft.ui.state import State
from ft.workspace import validate_name
from ft.workspace.atomic import atomic_write_bytes

UPLOADS = "data"  # uploads land in <workspace>/data/, beside the sample file

routes = RouteGroup()


@routes.get("/api/datasets")
def datasets(state: State) -> dataset_inspect_svc.DatasetList:
    return dataset_inspect_svc.list_datasets(state.ws)


@routes.get("/api/datasets/{name}")
def dataset_info(name: str, state: State, version: int | None = None) -> dataset_inspect_svc.DatasetInfo:
    return dataset_inspect_svc.dataset_info(state.ws, validate_name(name, "dataset"), version)


@routes.get("/api/datasets/{name}/records")
def dataset_records(
    name: str,
    state: State,
    split: str = "train",
    n: int = Query(5, ge=1, le=100),
    start: int = Query(0, ge=0),
) -> dataset_inspect_svc.ShowResult:
    return dataset_inspect_svc.show_dataset(
        state.ws, validate_name(name, "dataset"), split=split, n=n, start=start
    )


@routes.delete("/api/datasets/{name}")
def dataset_rm(name: str, state: State, version: int | None = None) -> datasets_svc.RemoveResult:
    return datasets_svc.remove_dataset(state.ws, validate_name(name, "dataset"), version)


@routes.post("/api/datasets/upload")
async def dataset_upload(request: Request, state: State, filename: str = Query(...)) -> UploadResult:
    """The raw request body saved as ``data/<filename>`` (atomically; an existing file is not replaced).
    Bodies over the limit are refused with 413 before anything is written."""
    validate_name(filename, "file name")
    body = await request.body()
    target = state.ws.root / UPLOADS / filename
    state.inside(target.parent)
    if target.exists():
        raise FtError(ErrorCode.USAGE, f"{UPLOADS}/{filename} already exists", "upload it under another name")
    atomic_write_bytes(target, body)
    return UploadResult(path=f"{UPLOADS}/{filename}", bytes=len(body))


@routes.post("/api/datasets/prepare")
def dataset_prepare(body: PrepareStart, state: State) -> Job:
    """`ft dataset prepare SOURCE`; every other field of the body is the option of the same name."""
    if body.source.startswith("-"):
        raise FtError(ErrorCode.USAGE, "a source cannot start with '-'", None)
    local = state.ws.root / body.source
    if "/" in body.source and not re.fullmatch(r"[\w.-]+/[\w.-]+", body.source) or local.exists():
        state.inside(local)  # a path: only files of the workspace
    args = ["dataset", "prepare", body.source]
    args += name_arg("--name", body.name, "dataset name")
    options = body.model_dump(exclude={"source", "name"})
    if options.get("tools"):
        options["tools"] = str(state.inside(state.ws.root / options["tools"]))
    for field, value in options.items():  # max_bad -> --max-bad ...
        option = "--" + field.replace("_", "-")
        if isinstance(value, str) and value.startswith("-"):
            raise FtError(ErrorCode.USAGE, f"{option} {value!r}: not a value", None)
        args += flag(option, value)
    return state.queue.submit("prepare", args)
