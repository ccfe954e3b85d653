"""Runs and training: list and show runs, start / stop / resume training, a run's metrics (whole, or
streamed as server-sent events while it trains). A training key is a job id or a run id or name."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request
from fastapi.responses import StreamingResponse

from ft.engine.callbacks import read_metrics
from ft.errors import ErrorCode, FtError
from ft.server.routes import RouteGroup
from ft.services import datasets as datasets_svc
from ft.services import runs as runs_svc
from ft.services.run_record import TABLE, RunRecord
from ft.ui.jobs import Job
from ft.ui.routes import name_arg
from ft.ui.schemas import Metrics, TrainingStatus, TrainStart
from ft.ui.state import State, UiState
from ft.workspace import validate_name
from ft.workspace.run_folder import METRICS

SSE_POLL_S = 0.25

routes = RouteGroup()


@routes.get("/api/runs")
def runs(state: State) -> runs_svc.RunList:
    return runs_svc.list_runs(state.ws)


@routes.get("/api/runs/{run}")
def run_detail(run: str, state: State) -> runs_svc.RunDetail:
    return runs_svc.show_run(state.ws, validate_name(run, "run"))


@routes.post("/api/training/start")
def training_start(body: TrainStart, state: State) -> Job:
    args = ["train"]
    if body.dataset:
        datasets_svc.parse_dataset_ref(body.dataset)
        args += ["--dataset", body.dataset]
    args += name_arg("--name", body.name, "run name")
    for s in body.set:
        if "=" not in s or s.startswith("-"):
            raise FtError(ErrorCode.USAGE, f"--set {s!r}: expected section.key=value", None)
        args += ["--set", s]
    return state.queue.submit("train", args)


def _status(state: UiState, key: str) -> TrainingStatus:
    job: Job | None = None
    run_id: str | None = None
    if state.is_job(key):
        job = state.queue.get(key)
        run_id = job.run_id
    else:
        run_id = runs_svc.show_run(state.ws, key).summary.id
    summary = runs_svc.show_run(state.ws, run_id).summary if run_id else None
    progress = eta = None
    if summary and summary.step is not None and summary.total_steps:
        progress = summary.step / summary.total_steps
        if summary.train_seconds and summary.step and summary.status == "running":
            eta = summary.train_seconds / summary.step * (summary.total_steps - summary.step)
    return TrainingStatus(job=job, run=summary, progress=progress, eta_seconds=eta)


@routes.get("/api/training/{job_id}/status")
def training_status(job_id: str, state: State) -> TrainingStatus:
    return _status(state, job_id)


@routes.post("/api/training/{key}/stop")
def training_stop(key: str, state: State) -> TrainingStatus:
    """Stop a job (queued or running), or a run started elsewhere (SIGINT to its process: it saves and stops)."""
    st = _status(state, key)
    if st.job is not None and st.job.status in ("queued", "running"):
        state.queue.stop(st.job.id)
    elif st.run is not None and st.run.status == "running":
        rec = RunRecord.of(state.ws.registry().get(TABLE, id=st.run.id))
        if rec.pid is None or rec.process_alive() is not True:
            raise FtError(ErrorCode.USAGE, f"run {st.run.id}'s process is not on this machine", None)
        os.kill(rec.pid, signal.SIGINT)
    else:
        raise FtError(ErrorCode.USAGE, f"{key} is not running", None)
    return _status(state, key)


@routes.post("/api/training/{run}/resume")
def training_resume(run: str, state: State) -> Job:
    run_id = runs_svc.show_run(state.ws, validate_name(run, "run")).summary.id
    return state.queue.submit("train", ["train", "--resume", run_id])


def _run_of(state: UiState, key: str) -> str:
    validate_name(key, "run or job")
    if state.is_job(key):
        run_id = state.queue.get(key).run_id
        if run_id is None:
            raise FtError(ErrorCode.NOT_FOUND, f"job {key} has no run yet", "wait for it to start")
        return run_id
    return runs_svc.show_run(state.ws, key).summary.id


@routes.get("/api/metrics/{job_id}")
def metrics(job_id: str, state: State) -> Metrics:
    run_id = _run_of(state, job_id)
    return Metrics(run_id=run_id, rows=read_metrics(state.ws.run_dir(run_id) / METRICS))


@routes.get("/api/metrics/{job_id}/stream", response_class=StreamingResponse)
async def metrics_stream(job_id: str, request: Request, state: State) -> StreamingResponse:
    """Server-sent events: each metrics.jsonl row as it is written (``data: {...}``), from the first."""
    run_id = _run_of(state, job_id)
    path = state.ws.run_dir(run_id) / METRICS
    return StreamingResponse(
        _metric_events(request, run_id, path),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store"},
    )


async def _metric_events(request: Request, run_id: str, path: Path) -> AsyncIterator[str]:
    offset = 0
    pending = b""
    yield f"event: run\ndata: {json.dumps({'run_id': run_id})}\n\n"
    while not await request.is_disconnected():
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield f"data: {line.decode('utf-8', 'replace')}\n\n"
        else:
            yield ": keep-alive\n\n"
        await asyncio.sleep(SSE_POLL_S)
