"""The dashboard's job queue: `ft` commands started from the page, each a detached subprocess.

A job is a folder ``<workspace>/jobs/<id>/`` (``job.json``: what to run; then what :mod:`ft.ui.runner`
writes: ``child.pid``, ``stdout.json``, ``output.log``, ``exit.json``). The state lives only in those files,
so a restarted ``ft ui`` sees the jobs of the one before, and a job outlives the server that started it.
Training jobs run one at a time (``max_training``); the others start at once, up to ``max_other``.
A training job's run is the registry row whose recorded pid is the job's ``ft`` process: a run started
from the page is an ordinary `ft train` run, listed by `ft runs list` like any other.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ft.errors import ErrorCode, FtError
from ft.services.run_record import pid_alive
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_write_json

JOBS = "jobs"
Kind = Literal["train", "prepare", "evaluate", "export", "pull"]
Status = Literal["queued", "running", "completed", "failed", "stopped", "lost"]


class Job(BaseModel):
    id: str
    kind: Kind
    args: list[str]
    """The `ft` arguments (after `ft --workspace WS`); `--json` is added."""
    status: Status
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    pid: int | None = None
    """The `ft` process."""
    run_id: str | None = None
    """The training run (train jobs), once the run is recorded."""
    result: dict[str, Any] | None = None
    """The command's --json output: its result model, or the error ({"error": ...})."""
    log_tail: str = ""
    """The last lines the command wrote to stderr."""


class JobList(BaseModel):
    jobs: list[Job]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class JobQueue:
    def __init__(self, ws: Workspace, max_training: int = 1, max_other: int = 2, poll_s: float = 0.3):
        self.ws = ws
        self.dir = ws.root / JOBS
        self.max_training = max_training
        self.max_other = max_other
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- files -------------------------------------------------------------------------------------
    def _folder(self, job_id: str) -> Path:
        return self.dir / validate_name(job_id, "job id")

    def submit(self, kind: Kind, args: list[str]) -> Job:
        job_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        folder = self._folder(job_id)
        folder.mkdir(parents=True)
        spec = {
            "id": job_id,
            "kind": kind,
            "args": args,
            "workspace": str(self.ws.root),
            "created_at": _now(),
        }
        atomic_write_json(folder / "job.json", spec)
        self.tick()
        return self.get(job_id)

    def _load(self, folder: Path) -> Job | None:
        spec = _read_json(folder / "job.json")
        if not isinstance(spec, dict):
            return None
        job = Job(
            id=spec["id"],
            kind=spec["kind"],
            args=spec["args"],
            status="queued",
            created_at=spec["created_at"],
        )
        started = _read_json(folder / "started.json")
        if started:
            job.started_at = started["started_at"]
            job.status = "running"
        pid_text = (folder / "child.pid").read_text() if (folder / "child.pid").is_file() else ""
        job.pid = int(pid_text) if pid_text.strip().isdigit() else None
        done = _read_json(folder / "exit.json")
        if done:
            job.exit_code = done["exit_code"]
            job.finished_at = done["finished_at"]
            job.status = (
                "completed" if job.exit_code == 0 else "stopped" if job.exit_code in (130, 143) else "failed"
            )
        elif started and not self._running(job.id, started.get("runner_pid")):
            job.status = "lost"
        out = _read_json(folder / "stdout.json")
        if isinstance(out, dict):
            job.result = out
        job.log_tail = _tail(folder / "output.log")
        if job.kind == "train":
            known = _read_json(folder / "run.json")
            job.run_id = known["run_id"] if isinstance(known, dict) else self._run_of(job)
            if job.run_id and not known:  # kept: a resume later records another pid on the same run
                atomic_write_json(folder / "run.json", {"run_id": job.run_id})
        return job

    def _running(self, job_id: str, runner_pid: int | None) -> bool:
        child = self._children.get(job_id)
        if child is not None:
            return child.poll() is None
        return runner_pid is not None and pid_alive(runner_pid)

    def _run_of(self, job: Job) -> str | None:
        if job.result and isinstance(job.result.get("run_id"), str):
            return job.result["run_id"]
        if job.pid is None or not self.ws.db_path.exists():
            return None
        for row in self.ws.registry().list("runs"):
            if (row.get("meta") or {}).get("pid") == job.pid:
                return row["id"]
        return None

    def get(self, job_id: str) -> Job:
        folder = self._folder(job_id)
        job = self._load(folder) if folder.is_dir() else None
        if job is None:
            raise FtError(ErrorCode.NOT_FOUND, f"no job {job_id!r}", "GET /api/jobs lists them")
        return job

    def list(self) -> JobList:
        if not self.dir.is_dir():
            return JobList(jobs=[])
        jobs = [j for p in sorted(self.dir.iterdir()) if p.is_dir() and (j := self._load(p))]
        return JobList(jobs=jobs)

    # -- scheduling --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Start the queued jobs that may start now (oldest first)."""
        with self._lock:
            jobs = self.list().jobs
            running = [j for j in jobs if j.status == "running"]
            trains = sum(j.kind == "train" for j in running)
            others = len(running) - trains
            for j in jobs:
                if j.status != "queued":
                    continue
                if j.kind == "train":
                    if trains >= self.max_training:
                        continue
                    trains += 1
                else:
                    if others >= self.max_other:
                        continue
                    others += 1
                self._start(j)

    def _start(self, job: Job) -> None:
        folder = self._folder(job.id)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ft.ui.runner", str(folder)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives ft ui, and gets its own signals
            cwd=self.ws.root,  # relative paths (data/NAME) mean the workspace's
            env={k: v for k, v in os.environ.items() if k != "FT_WORKSPACE"},
        )
        self._children[job.id] = proc
        atomic_write_json(folder / "started.json", {"started_at": _now(), "runner_pid": proc.pid})

    def stop(self, job_id: str) -> Job:
        """A running job: SIGINT to its process group (`ft train` finishes the step, saves and stops).
        A queued one is dropped (marked as stopped without running)."""
        job = self.get(job_id)
        folder = self._folder(job_id)
        if job.status == "queued":
            atomic_write_json(folder / "started.json", {"started_at": _now(), "runner_pid": None})
            atomic_write_json(folder / "exit.json", {"exit_code": 130, "finished_at": _now()})
        elif job.status == "running":
            started = _read_json(folder / "started.json") or {}
            pid = started.get("runner_pid")
            if pid:
                try:
                    os.killpg(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        else:
            raise FtError(ErrorCode.USAGE, f"job {job_id} is {job.status}, not running", None)
        return self.get(job_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
                for job_id, child in list(self._children.items()):
                    if child.poll() is not None:  # reap the runner (the job's files say how it ended)
                        del self._children[job_id]
            except Exception:  # noqa: BLE001 - the scheduler must survive a bad job folder
                import logging

                logging.getLogger("ft.ui").exception("job queue")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ft-ui-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
