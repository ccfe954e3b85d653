"""`ft models`: pull (catalog, Hugging Face, local folder, .gguf), list, info, rm; and name -> folder for other services.

A pulled model is a self-describing folder ``models/<name>/`` (mlx-lm layout plus ``ft_model.json``
saying where it came from) and a row in the workspace registry. With FT_MODELS_CACHE set, the folder
lives in that shared cache and ``models/<name>`` is a symlink to it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ft.config.settings import load_settings
from ft.errors import ErrorCode, FtError
from ft.models import catalog as cat
from ft.models.memory import MemoryEstimate
from ft.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

MODEL_MANIFEST = "ft_model.json"
STAGING_PREFIX = ".download-"  # kept between pulls so an interrupted download resumes


class ModelRecord(BaseModel):
    name: str
    path: str
    source: str
    kind: str  # embedded | hf | local_dir | gguf
    revision: str | None = None
    commit: str | None = None
    architecture: str
    parameters: int
    quantization: str
    dtype: str
    size_bytes: int
    sha256: dict[str, str]
    quantize: int | None = None
    converted_dtype: str | None = None
    trust_remote_code: bool = False
    pulled_at: str | None = None


class CatalogRow(BaseModel):
    """A catalog entry (:class:`ft.models.catalog.CatalogEntry`, field for field) and whether it is pulled."""

    name: str
    source: str
    architecture: str
    parameters: int
    quantization: str
    download_bytes: int
    description: str
    gated: bool
    pulled: bool


class ModelList(BaseModel):
    models: list[ModelRecord]
    catalog: list[CatalogRow]


class PullResult(BaseModel):
    model: ModelRecord
    already_present: bool
    steps: list[str]


class FileRow(BaseModel):
    name: str
    size_bytes: int
    sha256: str | None = None


class MemoryReport(MemoryEstimate):
    """The memory plan `ft models info` shows, and the train.yml it was computed with."""

    config_path: str | None


class ModelInfo(BaseModel):
    model: ModelRecord
    files: list[FileRow]
    verified: bool | None = None  # None: hashes not recomputed (--verify does)
    memory: MemoryReport | None = None
    memory_error: str | None = None


class RemoveResult(BaseModel):
    name: str
    path: str
    freed_bytes: int
    runs_using: list[str]


# ----------------------------------------------------------------------------------------- paths
def models_root(ws: Workspace) -> Path:
    """Where model folders are written: FT_MODELS_CACHE when set, else the workspace's models/."""
    cache = load_settings().models_cache
    return Path(cache).expanduser().resolve() if cache else ws.models_dir


def _folder(ws: Workspace, name: str) -> Path:
    validate_name(name, "model name")
    return models_root(ws) / name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _record_from_row(row: dict[str, Any]) -> ModelRecord:
    return ModelRecord(**{**row["meta"], "name": row["name"]})


# ----------------------------------------------------------------------------------------- lookups
def find_row(ws: Workspace, name: str) -> dict[str, Any] | None:
    """The registry row of a pulled model by its name, else by its source (catalog name / repo id)."""
    reg = ws.registry()
    row = None
    try:
        validate_name(name, "model name")
        row = reg.get("models", name=name)
    except FtError:
        pass
    if row is None:
        matches = [
            r for r in reg.list("models") if r.get("source") == name or r["meta"].get("source") == name
        ]
        row = matches[-1] if matches else None
    return row


def get_model(ws: Workspace, name: str) -> ModelRecord:
    """The registry record of a pulled model, by its name (or its source: catalog name / repo id)."""
    row = find_row(ws, name)
    if row is None:
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"model {name!r} is not pulled in {ws.root}",
            f"pull it: ft models pull {name}",
        )
    return _record_from_row(row)


def model_dir(ws: Workspace, name: str) -> Path:
    """The folder of a pulled model (for training, evaluation, export and serving)."""
    rec = get_model(ws, name)
    path = Path(rec.path)
    if not (path / "config.json").is_file():
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"model {rec.name} is registered but its folder {path} is missing or incomplete",
            f"pull it again: ft models rm {rec.name} --yes && ft models pull {rec.source}",
        )
    return path


# ----------------------------------------------------------------------------------------- list
def list_models(ws: Workspace) -> ModelList:
    models = [_record_from_row(r) for r in ws.registry().list("models")]
    pulled_sources = {m.source for m in models} | {m.name for m in models}
    rows = [
        CatalogRow(**dataclasses.asdict(e), pulled=e.name in pulled_sources or e.source in pulled_sources)
        for e in cat.CATALOG
    ]
    return ModelList(models=models, catalog=rows)


# ----------------------------------------------------------------------------------------- hub search
class HubModel(BaseModel):
    id: str
    downloads: int | None = None
    likes: int | None = None
    tags: list[str] = []
    pipeline_tag: str | None = None


class HubSearch(BaseModel):
    query: str
    endpoint: str
    models: list[HubModel]
    error: str | None = None
    """Why the Hub could not be searched (offline, unreachable); the models list is then empty."""


def search_hub(query: str, limit: int = 20) -> HubSearch:
    """Hugging Face model repositories matching ``query``, when the Hub can be reached (else the reason)."""
    from ft.models.hub import hub_endpoint, search_repos

    try:
        found = [HubModel(**m) for m in search_repos(query, limit)]
    except FtError as e:
        return HubSearch(query=query, endpoint=hub_endpoint(), models=[], error=e.message)
    return HubSearch(query=query, endpoint=hub_endpoint(), models=found)


def ensure_model(
    ws: Workspace, name: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> Path:
    """The folder of ``name``, pulling it first when it is a catalog name or repo id not pulled yet."""
    try:
        return model_dir(ws, name)
    except FtError as e:
        if e.code != ErrorCode.NOT_FOUND:
            raise
    return Path(pull(ws, name, revision=revision, trust_remote_code=trust_remote_code).model.path)


# ----------------------------------------------------------------------------------------- info
def info(ws: Workspace, name: str, *, verify: bool = False, overrides: list[str] | None = None) -> ModelInfo:
    from ft.workspace.atomic import sha256_file

    rec = get_model(ws, name)
    folder = model_dir(ws, rec.name)
    files = []
    ok = True
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        sha = rec.sha256.get(p.name)
        if verify and sha is not None:
            now = sha256_file(p)
            ok = ok and now == sha
            if now != sha:
                sha = f"{now} (CHANGED; recorded {sha})"
        files.append(FileRow(name=p.name, size_bytes=p.stat().st_size, sha256=sha))
    result = ModelInfo(model=rec, files=files, verified=ok if verify else None)
    try:
        result.memory = memory_report(ws, folder, overrides or [])
    except FtError as e:
        result.memory_error = f"{e.message}" + (f" ({e.hint})" if e.hint else "")
    return result


def memory_report(ws: Workspace, folder: Path, overrides: list[str]) -> MemoryReport:
    from ft.config.loader import load_config
    from ft.models.inspect import inspect_folder
    from ft.models.loading import available_memory_bytes, on_cpu
    from ft.models.memory import estimate_training_memory

    resolved = load_config(ws, overrides)
    est = estimate_training_memory(
        inspect_folder(folder), resolved.config, available_bytes=available_memory_bytes(), on_cpu=on_cpu()
    )
    return MemoryReport(**est.model_dump(), config_path=str(resolved.path) if resolved.path else None)


# ----------------------------------------------------------------------------------------- rm
def remove(ws: Workspace, name: str) -> RemoveResult:
    validate_name(name, "model name")
    reg = ws.registry()
    row = reg.get("models", name=name)
    link = ws.models_dir / name
    folder = Path(row["meta"]["path"]) if row else _folder(ws, name)
    if row is None and not folder.exists() and not link.is_symlink():
        raise FtError(ErrorCode.NOT_FOUND, f"no model named {name!r} in {ws.root}", "see `ft models list`")
    runs = [
        r["id"]
        for r in reg.list("runs")
        if (r.get("meta") or {}).get("model") in {name, (row or {}).get("source")}
    ]
    freed = 0
    if link.is_symlink():
        link.unlink()  # the shared cache folder stays for other workspaces
    elif folder.exists():
        freed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        # Rename first so a crash mid-delete never leaves a half model under the real name.
        doomed = folder.with_name(f".tmp-rm-{name}")
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    reg.delete("models", name=name)
    return RemoveResult(name=name, path=str(folder), freed_bytes=freed, runs_using=runs)


# `ft models pull` lives in its own module; importable from here as before (it needs the names above).
from ft.services.model_pull import download_progress, pull  # noqa: E402, F401
