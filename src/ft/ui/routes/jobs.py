"""The job queue (:mod:`ft.ui.jobs`): list, show, stop, and a prepare job's rejected records."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi import Query

from ft.server.routes import RouteGroup
from ft.ui.jobs import Job, JobList
from ft.ui.schemas import Rejected
from ft.ui.state import State

routes = RouteGroup()


@routes.get("/api/jobs")
def jobs(state: State) -> JobList:
    return state.queue.list()


@routes.get("/api/jobs/{job_id}")
def job(job_id: str, state: State) -> Job:
    return state.queue.get(job_id)


@routes.post("/api/jobs/{job_id}/stop")
def stop_job(job_id: str, state: State) -> Job:
    return state.queue.stop(job_id)


@routes.get("/api/jobs/{job_id}/rejected")
def job_rejected(job_id: str, state: State, limit: int = Query(200, ge=1, le=5000)) -> Rejected:
    """The rejected records of a prepare job (its rejected.jsonl: line, reason, message), also when it failed."""
    job = state.queue.get(job_id)
    res = job.result or {}
    file = res.get("rejected_file")
    if not file:
        m = re.search(r"listed in (\S+)", str(res.get("message", "")))
        file = m.group(1) if m else None
    if not file:
        return Rejected(file=None, records=[])
    path = state.inside(Path(file))
    records = []
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= limit:
                    break
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    return Rejected(file=str(path.relative_to(state.ws.root.resolve())), records=records)
