"""`ft ui`: the dashboard's FastAPI application: a REST API over the services, and the static page.

Every /api route returns a service's pydantic result (the model `ft ... --json` prints), or a job of the
queue (:mod:`ft.ui.jobs`) for long work (train, prepare, evaluate, export, pull), which runs as an `ft`
subprocess. Chat goes to the `ft serve` application (:func:`ft.server.app.create_app`), mounted at /serve,
so the playground and POST /api/inference/generate use the one generator of `ft serve`.

Safety: the same rule as `ft serve` (:mod:`ft.server.security`): on loopback without a key, only requests
whose Host names this machine (DNS rebinding); with ``serve_api_key`` every route but /health and the page's
static files needs ``Authorization: Bearer <key>`` (the page asks for the key and keeps it in the tab's
sessionStorage; there is no cookie, so another site cannot make a browser send it). Request bodies are
size-limited (:class:`ft.server.security.BodyLimit`: 413 before the route runs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, SecretStr

from ft.engine.callbacks import read_metrics
from ft.errors import ErrorCode, FtError
from ft.server.security import BearerAuth, BodyLimit, HostGuard
from ft.services import dataset_inspect as dataset_inspect_svc
from ft.services import datasets as datasets_svc
from ft.services import eval_report as evaluation_svc
from ft.services import export as export_svc
from ft.services import models as models_svc
from ft.services import project as project_svc
from ft.services import runs as runs_svc
from ft.services.run_record import TABLE, RunRecord
from ft.ui.configfile import ConfigSaved, ConfigSchema, config_schema, field_errors, save_config
from ft.ui.jobs import JOBS, Job, JobList, JobQueue
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_write_bytes
from ft.workspace.run_folder import METRICS

log = logging.getLogger("ft.ui")
STATIC = Path(__file__).parent / "static"
UPLOADS = "data"  # uploads land in <workspace>/data/, beside the sample file
PUBLIC = ("/", "/health", "/favicon.ico")
SSE_POLL_S = 0.25

_STATUS = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.NAME_INVALID: 400,
    ErrorCode.USAGE: 400,
    ErrorCode.CONFIG_INVALID: 422,
}


class UiConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: SecretStr | None = None
    max_upload_bytes: int = 64 << 20
    max_training: int = 1
    serve_chat: bool = True
    """Mount `ft serve`'s OpenAI API at /serve for the playground."""


# -- request bodies -----------------------------------------------------------------------------------
class TrainStart(BaseModel):
    dataset: str | None = None
    name: str | None = None
    set: list[str] = Field(default_factory=list)
    """--set overrides, section.key=value."""


class PrepareStart(BaseModel):
    source: str
    """A file under the workspace (as uploaded: data/NAME) or a Hugging Face dataset id."""
    name: str | None = None
    model: str | None = None
    format: str | None = None
    template: str | None = None
    max_bad: str | None = None
    labels: str | None = None
    val: float | None = None
    test: float | None = None
    train_on: str | None = None
    max_seq_length: int | None = None
    on_long: str | None = None
    show_content: bool = False
    hf_split: str | None = None
    hf_config: str | None = None
    tools: str | None = None
    """A JSON file of tool definitions, under the workspace."""
    unknown_tool: str | None = None
    stratify_by: str | None = None
    group_by: str | None = None


class EvaluateStart(BaseModel):
    run: str | None = None
    checkpoint: str | None = None
    split: str | None = None
    n_samples: int | None = Field(None, ge=0, le=1000)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    limit: int | None = Field(None, ge=1)


class ExportStart(BaseModel):
    run: str | None = None
    format: str = "gguf"
    quant: str | None = None
    checkpoint: str | None = None


class PullStart(BaseModel):
    source: str
    name: str | None = None


class ConfigValues(BaseModel):
    values: dict[str, Any]


# -- results the CLI has no model for ------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"] = "ok"
    workspace: str
    auth: bool


class UploadResult(BaseModel):
    path: str
    """Relative to the workspace: what POST /api/datasets/prepare takes as ``source``."""
    bytes: int


class Metrics(BaseModel):
    run_id: str
    rows: list[dict[str, Any]]


class TrainingStatus(BaseModel):
    job: Job | None
    run: runs_svc.RunSummary | None
    progress: float | None
    """Fraction of the steps done."""
    eta_seconds: float | None


class ConfigCheck(BaseModel):
    ok: bool
    errors: dict[str, str]
    """Per dotted key: the loader's message."""
    message: str | None = None


class Rejected(BaseModel):
    file: str | None
    records: list[dict[str, Any]]


class ExportList(BaseModel):
    exports: list[dict[str, Any]]


class EvaluationList(BaseModel):
    evaluations: list[evaluation_svc.EvaluationSummary]


def _flag(name: str, value: Any) -> list[str]:
    if value is None or value is False:
        return []
    if value is True:
        return [name]
    return [name, str(value)]


def _inside(ws: Workspace, path: Path) -> Path:
    rp = path.resolve()
    root = ws.root.resolve()
    if rp != root and root not in rp.parents:
        raise FtError(ErrorCode.NAME_INVALID, f"{path} is outside the workspace", None)
    return rp


class _Public:
    """Routes the page's static files and /health around the API key check (they hold no data)."""

    def __init__(self, guarded: Any, open_app: Any):
        self.guarded, self.open_app = guarded, open_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path in PUBLIC or path.startswith("/static/")):
            return await self.open_app(scope, receive, send)
        return await self.guarded(scope, receive, send)


def create_app(ws: Workspace, config: UiConfig, queue: JobQueue | None = None) -> Any:
    queue = queue or JobQueue(ws, max_training=config.max_training)
    serve_app: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        async with AsyncExitStack() as stack:
            if config.serve_chat:
                inner = _serving_app(ws, config)
                if inner is not None:
                    await stack.enter_async_context(
                        inner[0].fastapi.router.lifespan_context(inner[0].fastapi)
                    )
                    serve_app["app"], serve_app["default"] = inner
            try:
                yield
            finally:
                queue.close()

    app = FastAPI(
        title="ft ui",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.queue = queue

    @app.exception_handler(FtError)
    async def _ft_error(request: Request, exc: FtError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=_STATUS.get(exc.code, 400))

    # -- page -----------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        validate_name(name, "file")
        path = STATIC / name
        if not path.is_file():
            raise FtError(ErrorCode.NOT_FOUND, f"no file {name}", None)
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> Health:
        return Health(workspace=ws.root.name, auth=config.api_key is not None)

    # -- runs and training ------------------------------------------------------------------------------
    @app.get("/api/runs")
    def runs() -> runs_svc.RunList:
        return runs_svc.list_runs(ws)

    @app.get("/api/runs/{run}")
    def run_detail(run: str) -> runs_svc.RunDetail:
        return runs_svc.show_run(ws, validate_name(run, "run"))

    @app.get("/api/jobs")
    def jobs() -> JobList:
        return queue.list()

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> Job:
        return queue.get(job_id)

    @app.post("/api/jobs/{job_id}/stop")
    def stop_job(job_id: str) -> Job:
        return queue.stop(job_id)

    @app.post("/api/training/start")
    def training_start(body: TrainStart) -> Job:
        args = ["train"]
        if body.dataset:
            datasets_svc.parse_dataset_ref(body.dataset)
            args += ["--dataset", body.dataset]
        if body.name:
            args += ["--name", validate_name(body.name, "run name")]
        for s in body.set:
            if "=" not in s or s.startswith("-"):
                raise FtError(ErrorCode.USAGE, f"--set {s!r}: expected section.key=value", None)
            args += ["--set", s]
        return queue.submit("train", args)

    def _status(key: str) -> TrainingStatus:
        job: Job | None = None
        run_id: str | None = None
        if (ws.root / JOBS / validate_name(key, "job id")).is_dir():
            job = queue.get(key)
            run_id = job.run_id
        else:
            run_id = runs_svc.show_run(ws, key).summary.id
        summary = runs_svc.show_run(ws, run_id).summary if run_id else None
        progress = eta = None
        if summary and summary.step is not None and summary.total_steps:
            progress = summary.step / summary.total_steps
            if summary.train_seconds and summary.step and summary.status == "running":
                eta = summary.train_seconds / summary.step * (summary.total_steps - summary.step)
        return TrainingStatus(job=job, run=summary, progress=progress, eta_seconds=eta)

    @app.get("/api/training/{job_id}/status")
    def training_status(job_id: str) -> TrainingStatus:
        return _status(job_id)

    @app.post("/api/training/{key}/stop")
    def training_stop(key: str) -> TrainingStatus:
        """Stop a job (queued or running), or a run started elsewhere (SIGINT to its process: it saves and stops)."""
        st = _status(key)
        if st.job is not None and st.job.status in ("queued", "running"):
            queue.stop(st.job.id)
        elif st.run is not None and st.run.status == "running":
            rec = RunRecord.of(ws.registry().get(TABLE, id=st.run.id))
            if rec.pid is None or rec.process_alive() is not True:
                raise FtError(ErrorCode.USAGE, f"run {st.run.id}'s process is not on this machine", None)
            os.kill(rec.pid, signal.SIGINT)
        else:
            raise FtError(ErrorCode.USAGE, f"{key} is not running", None)
        return _status(key)

    @app.post("/api/training/{run}/resume")
    def training_resume(run: str) -> Job:
        run_id = runs_svc.show_run(ws, validate_name(run, "run")).summary.id
        return queue.submit("train", ["train", "--resume", run_id])

    def _run_of(key: str) -> str:
        validate_name(key, "run or job")
        if (ws.root / JOBS / key).is_dir():
            run_id = queue.get(key).run_id
            if run_id is None:
                raise FtError(ErrorCode.NOT_FOUND, f"job {key} has no run yet", "wait for it to start")
            return run_id
        return runs_svc.show_run(ws, key).summary.id

    @app.get("/api/metrics/{job_id}")
    def metrics(job_id: str) -> Metrics:
        run_id = _run_of(job_id)
        return Metrics(run_id=run_id, rows=read_metrics(ws.run_dir(run_id) / METRICS))

    @app.get("/api/metrics/{job_id}/stream", response_class=StreamingResponse)
    async def metrics_stream(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: each metrics.jsonl row as it is written (``data: {...}``), from the first."""
        run_id = _run_of(job_id)
        path = ws.run_dir(run_id) / METRICS

        async def events() -> AsyncIterator[str]:
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

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    # -- models ---------------------------------------------------------------------------------------
    @app.get("/api/models")
    def models() -> models_svc.ModelList:
        return models_svc.list_models(ws)

    @app.get("/api/models/search")
    def models_search(q: str = Query("", max_length=200)) -> models_svc.ModelList:
        """Workspace models and catalog entries whose name, source or description contain ``q``."""
        found = models_svc.list_models(ws)
        needle = q.lower()

        def hit(*texts: Any) -> bool:
            return any(needle in str(t or "").lower() for t in texts)

        return models_svc.ModelList(
            models=[m for m in found.models if hit(m.name, m.source, m.architecture)],
            catalog=[c for c in found.catalog if hit(c.name, c.source, c.description, c.architecture)],
        )

    @app.get("/api/models/hub")
    def models_hub(q: str = Query(..., min_length=1, max_length=200)) -> models_svc.HubSearch:
        """Hugging Face model repositories matching ``q`` when the Hub is reachable (else ``error`` says why)."""
        return models_svc.search_hub(q)

    @app.get("/api/models/{name}")
    def model_info(name: str) -> models_svc.ModelInfo:
        """`ft models info NAME`: files, and whether training it with the current train.yml fits in memory."""
        return models_svc.info(ws, validate_name(name, "model"))

    @app.post("/api/models/pull")
    def models_pull(body: PullStart) -> Job:
        args = ["models", "pull", body.source]
        if body.name:
            args += ["--name", validate_name(body.name, "model name")]
        if body.source.startswith("-"):
            raise FtError(ErrorCode.USAGE, "a source cannot start with '-'", None)
        return queue.submit("pull", args)

    # -- datasets -------------------------------------------------------------------------------------
    @app.get("/api/datasets")
    def datasets() -> dataset_inspect_svc.DatasetList:
        return dataset_inspect_svc.list_datasets(ws)

    @app.get("/api/datasets/{name}")
    def dataset_info(name: str, version: int | None = None) -> dataset_inspect_svc.DatasetInfo:
        return dataset_inspect_svc.dataset_info(ws, validate_name(name, "dataset"), version)

    @app.get("/api/datasets/{name}/records")
    def dataset_records(
        name: str, split: str = "train", n: int = Query(5, ge=1, le=100), start: int = Query(0, ge=0)
    ) -> dataset_inspect_svc.ShowResult:
        return dataset_inspect_svc.show_dataset(
            ws, validate_name(name, "dataset"), split=split, n=n, start=start
        )

    @app.delete("/api/datasets/{name}")
    def dataset_rm(name: str, version: int | None = None) -> datasets_svc.RemoveResult:
        return datasets_svc.remove_dataset(ws, validate_name(name, "dataset"), version)

    @app.post("/api/datasets/upload")
    async def dataset_upload(request: Request, filename: str = Query(...)) -> UploadResult:
        """The raw request body saved as ``data/<filename>`` (atomically; an existing file is not replaced).
        Bodies over the limit are refused with 413 before anything is written."""
        validate_name(filename, "file name")
        body = await request.body()
        target = ws.root / UPLOADS / filename
        _inside(ws, target.parent)
        if target.exists():
            raise FtError(
                ErrorCode.USAGE, f"{UPLOADS}/{filename} already exists", "upload it under another name"
            )
        atomic_write_bytes(target, body)
        return UploadResult(path=f"{UPLOADS}/{filename}", bytes=len(body))

    @app.post("/api/datasets/prepare")
    def dataset_prepare(body: PrepareStart) -> Job:
        if body.source.startswith("-"):
            raise FtError(ErrorCode.USAGE, "a source cannot start with '-'", None)
        local = ws.root / body.source
        if "/" in body.source and not re.fullmatch(r"[\w.-]+/[\w.-]+", body.source) or local.exists():
            _inside(ws, local)  # a path: only files of the workspace
        args = ["dataset", "prepare", body.source]
        if body.name:
            args += ["--name", validate_name(body.name, "dataset name")]
        for flag, value in (
            ("--model", body.model),
            ("--format", body.format),
            ("--template", body.template),
            ("--max-bad", body.max_bad),
            ("--labels", body.labels),
            ("--val", body.val),
            ("--test", body.test),
            ("--train-on", body.train_on),
            ("--max-seq-length", body.max_seq_length),
            ("--on-long", body.on_long),
            ("--show-content", body.show_content),
            ("--hf-split", body.hf_split),
            ("--hf-config", body.hf_config),
            ("--tools", body.tools and str(_inside(ws, ws.root / body.tools))),
            ("--unknown-tool", body.unknown_tool),
            ("--stratify-by", body.stratify_by),
            ("--group-by", body.group_by),
        ):
            if isinstance(value, str) and value.startswith("-") and flag not in ("--val", "--test"):
                raise FtError(ErrorCode.USAGE, f"{flag} {value!r}: not a value", None)
            args += _flag(flag, value)
        return queue.submit("prepare", args)

    @app.get("/api/jobs/{job_id}/rejected")
    def job_rejected(job_id: str, limit: int = Query(200, ge=1, le=5000)) -> Rejected:
        """The rejected records of a prepare job (its rejected.jsonl: line, reason, message), also when it failed."""
        job = queue.get(job_id)
        res = job.result or {}
        file = res.get("rejected_file")
        if not file:
            m = re.search(r"listed in (\S+)", str(res.get("message", "")))
            file = m.group(1) if m else None
        if not file:
            return Rejected(file=None, records=[])
        path = _inside(ws, Path(file))
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
        return Rejected(file=str(path.relative_to(ws.root.resolve())), records=records)

    # -- config ---------------------------------------------------------------------------------------
    @app.get("/api/config")
    def config_get() -> project_svc.ConfigReport:
        return project_svc.show_config(ws)

    @app.get("/api/config/schema")
    def config_schema_() -> ConfigSchema:
        return config_schema(ws)

    def _check(values: dict[str, Any]) -> ConfigCheck:
        sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
        try:
            project_svc.show_config(ws, sets)
        except FtError as e:
            return ConfigCheck(ok=False, errors=field_errors(e.message), message=e.message)
        return ConfigCheck(ok=True, errors={})

    @app.post("/api/config/validate")
    def config_validate(body: ConfigValues) -> ConfigCheck:
        return _check(body.values)

    @app.put("/api/config")
    def config_put(body: ConfigValues) -> ConfigSaved:
        check = _check(body.values)
        if not check.ok:
            raise FtError(ErrorCode.CONFIG_INVALID, check.message or "invalid configuration", None)
        return save_config(ws, body.values)

    # -- evaluate, export -------------------------------------------------------------------------------
    @app.get("/api/evaluations")
    def evaluations(run: str | None = None) -> EvaluationList:
        return EvaluationList(evaluations=evaluation_svc.list_evaluations(ws, run))

    @app.get("/api/evaluations/report")
    def evaluation_report(path: str) -> dict[str, Any]:
        p = _inside(ws, ws.root / path)
        if p.suffix != ".json" or not p.is_file():
            raise FtError(ErrorCode.NOT_FOUND, f"no report {path}", None)
        return json.loads(p.read_text(encoding="utf-8"))

    @app.post("/api/evaluate")
    def evaluate_start(body: EvaluateStart) -> Job:
        args = ["evaluate"]
        if body.run:
            args += [validate_name(body.run, "run")]
        if body.checkpoint:
            args += ["--checkpoint", validate_name(body.checkpoint, "checkpoint")]
        if body.split:
            args += ["--split", validate_name(body.split, "split")]
        args += _flag("--n-samples", body.n_samples) + _flag("--max-tokens", body.max_tokens)
        args += _flag("--limit", body.limit)
        return queue.submit("evaluate", args)

    @app.get("/api/exports")
    def exports(run: str | None = None) -> ExportList:
        return ExportList(exports=export_svc.list_exports(ws, run))

    @app.post("/api/export")
    def export_start(body: ExportStart) -> Job:
        args = ["export", "--format", validate_name(body.format, "format")]
        if body.run:
            args += [validate_name(body.run, "run")]
        if body.quant:
            args += ["--quant", validate_name(body.quant, "quant")]
        if body.checkpoint:
            args += ["--checkpoint", validate_name(body.checkpoint, "checkpoint")]
        return queue.submit("export", args)

    @app.get("/api/exports/download")
    def export_download(path: str) -> FileResponse:
        p = _inside(ws, ws.root / path)
        roots = (ws.runs_dir.resolve(), (ws.root / "exports").resolve())
        if not p.is_file() or not any(r in p.parents for r in roots):
            raise FtError(ErrorCode.NOT_FOUND, f"no exported file {path}", None)
        return FileResponse(p, filename=p.name)

    # -- inference ------------------------------------------------------------------------------------
    @app.post("/api/inference/generate")
    async def generate(request: Request) -> Any:
        """An OpenAI chat completion (the body and answer of POST /serve/v1/chat/completions), not streamed."""
        inner = serve_app.get("app")
        if inner is None:
            raise FtError(ErrorCode.NOT_FOUND, "no model to chat with in this workspace", "ft models pull")
        import httpx

        body = await request.json()
        if not isinstance(body, dict):
            raise FtError(ErrorCode.USAGE, "the body must be a JSON object (an OpenAI chat request)", None)
        body["stream"] = False
        body.setdefault("model", serve_app["default"])
        transport = httpx.ASGITransport(app=inner.fastapi)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            r = await client.post("/v1/chat/completions", json=body, timeout=600)
        return JSONResponse(r.json(), status_code=r.status_code)

    api: Any = BodyLimit(app, config.max_upload_bytes)
    if config.api_key is not None:
        api = BearerAuth(api, config.api_key.get_secret_value())

    mounted = _Mount(api, serve_app)
    outer: Any = _Public(mounted, app)
    if config.api_key is None:
        outer = HostGuard(outer)
    outer.fastapi = app
    outer.queue = queue
    return outer


class _Mount:
    """/serve/... goes to `ft serve`'s application (its own key check and limits), the rest to the API."""

    def __init__(self, api: Any, serve_app: dict[str, Any]):
        self.api, self.serve_app = api, serve_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/serve/"):
            inner = self.serve_app.get("app")
            if inner is not None:
                scope = dict(scope, path=path[len("/serve") :], raw_path=None)
                return await inner(scope, receive, send)
        return await self.api(scope, receive, send)


def _serving_app(ws: Workspace, config: UiConfig) -> tuple[Any, str] | None:
    """`ft serve`'s application over this workspace's models (nothing loaded until asked) and the model
    `ft serve` would pick by default, or None when there is no model."""
    from ft.server.app import create_app as create_serve_app
    from ft.services import serving

    try:
        server_config, source, _info = serving.prepare(
            ws, serving.ServeOptions(host=config.host, max_models=2)
        )
    except FtError as e:
        log.info("playground off: %s", e.message)
        return None
    server_config = server_config.model_copy(update={"default_model": None, "api_key": config.api_key})
    return create_serve_app(server_config, source), _info.default_model
