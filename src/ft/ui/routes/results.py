"""Evaluations and exports: list them, read a report, download an exported file, start either (a job)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import FileResponse

from ft.errors import ErrorCode, FtError
from ft.server.routes import RouteGroup
from ft.services import eval_report as evaluation_svc
from ft.services import export as export_svc
from ft.ui.jobs import Job
from ft.ui.routes import flag, name_arg
from ft.ui.schemas import EvaluateStart, EvaluationList, ExportList, ExportStart
from ft.ui.state import State
from ft.workspace import validate_name

routes = RouteGroup()


@routes.get("/api/evaluations")
def evaluations(state: State, run: str | None = None) -> EvaluationList:
    return EvaluationList(evaluations=evaluation_svc.list_evaluations(state.ws, run))


@routes.get("/api/evaluations/report")
def evaluation_report(path: str, state: State) -> dict[str, Any]:
    p = state.inside(state.ws.root / path)
    if p.suffix != ".json" or not p.is_file():
        raise FtError(ErrorCode.NOT_FOUND, f"no report {path}", None)
    return json.loads(p.read_text(encoding="utf-8"))


@routes.post("/api/evaluate")
def evaluate_start(body: EvaluateStart, state: State) -> Job:
    args = ["evaluate", *name_arg(None, body.run, "run")]
    args += name_arg("--checkpoint", body.checkpoint, "checkpoint") + name_arg("--split", body.split, "split")
    args += flag("--n-samples", body.n_samples) + flag("--max-tokens", body.max_tokens)
    args += flag("--limit", body.limit)
    return state.queue.submit("evaluate", args)


@routes.get("/api/exports")
def exports(state: State, run: str | None = None) -> ExportList:
    return ExportList(exports=export_svc.list_exports(state.ws, run))


@routes.post("/api/export")
def export_start(body: ExportStart, state: State) -> Job:
    args = ["export", "--format", validate_name(body.format, "format"), *name_arg(None, body.run, "run")]
    args += name_arg("--quant", body.quant, "quant") + name_arg("--checkpoint", body.checkpoint, "checkpoint")
    return state.queue.submit("export", args)


@routes.get("/api/exports/download")
def export_download(path: str, state: State) -> FileResponse:
    p = state.inside(state.ws.root / path)
    roots = (state.ws.runs_dir.resolve(), (state.ws.root / "exports").resolve())
    if not p.is_file() or not any(r in p.parents for r in roots):
        raise FtError(ErrorCode.NOT_FOUND, f"no exported file {path}", None)
    return FileResponse(p, filename=p.name)
