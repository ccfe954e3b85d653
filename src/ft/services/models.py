"""`ft models`: pull (catalog, Hugging Face, local folder, .gguf), list, info, rm; and name -> folder for other services.

A pulled model is a self-describing folder ``models/<name>/`` (mlx-lm layout plus ``ft_model.json``
saying where it came from) and a row in the workspace registry. With FT_MODELS_CACHE set, the folder
lives in that shared cache and ``models/<name>`` is a symlink to it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ft.config.settings import load_settings
from ft.errors import ErrorCode, FtError
from ft.models import catalog as cat
from ft.models.convert import DTYPES, QUANT_BITS
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_dir, atomic_write_json, clean_leftovers

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


class MemoryReport(BaseModel):
    fits: bool
    verdict: str
    advice: list[str]
    total_bytes: int
    available_bytes: int
    weights_bytes: int
    weights_precision: str
    trainable_parameters: int
    adapter_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    assumptions: dict[str, Any]
    config_path: str | None
    logits_bytes: int = 0
    activation_bytes_without_checkpointing: int = 0
    activation_bytes_with_checkpointing: int = 0
    eval_bytes: int = 0
    gradient_checkpointing: bool = False
    budget_bytes: int = 0
    backward_bytes: int = 0


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
        CatalogRow(
            name=e.name,
            source=e.source,
            architecture=e.architecture,
            parameters=e.parameters,
            quantization=e.quantization,
            download_bytes=e.download_bytes,
            description=e.description,
            gated=e.gated,
            pulled=e.name in pulled_sources or e.source in pulled_sources,
        )
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


# ----------------------------------------------------------------------------------------- pull
def download_progress(update: Callable[[int, int | None], None]) -> type:
    """A tqdm class for :func:`pull` that reports (bytes done, bytes total) to ``update``."""
    from ft.models.hub import progress_tqdm

    return progress_tqdm(update)


def _describe(folder: Path, meta: dict[str, Any]) -> ModelRecord:
    from ft.models.architectures import architecture_of
    from ft.models.inspect import inspect_folder, weight_hashes

    info = inspect_folder(folder)
    arch = architecture_of(
        info.config, where=str(folder / "config.json"), trust_remote_code=bool(meta.get("trust_remote_code"))
    )
    return ModelRecord(
        **meta,
        path=str(folder),
        architecture=arch.model_type,
        parameters=info.parameters(),
        quantization=info.quantization_summary(),
        dtype=info.float_dtype(),
        size_bytes=info.size_bytes,
        sha256=weight_hashes(folder),
    )


def _verify_loadable(folder: Path, trust_remote_code: bool) -> None:
    """Build the model and check every weight name and shape (lazily: no weight data is read)."""
    from mlx_lm.utils import load_model

    try:
        load_model(folder, lazy=True, strict=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"{folder.name}: the weights do not match the architecture: {e}",
            "the source may be incomplete or of an unsupported variant",
        ) from None


def _link_into_workspace(ws: Workspace, name: str, folder: Path) -> None:
    link = ws.models_dir / name
    if folder.parent.resolve() == ws.models_dir.resolve():
        return
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(folder, target_is_directory=True)


def pull(
    ws: Workspace,
    source: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    quantize: int | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    tqdm_class: Any = None,
    on_step: Callable[[str], None] | None = None,
) -> PullResult:
    """Bring a model into the workspace; pulling the same thing again is a no-op that says so."""
    if quantize is not None and quantize not in QUANT_BITS:
        raise FtError(ErrorCode.USAGE, f"--quantize {quantize}: use 4 or 8")
    if dtype is not None and dtype not in DTYPES:
        raise FtError(ErrorCode.USAGE, f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    src = cat.resolve_source(source)
    if revision and src.kind != "hf":
        raise FtError(
            ErrorCode.USAGE,
            "--revision applies to Hugging Face repositories only",
            f"{source} is a {src.kind.replace('_', ' ')} source; drop --revision",
        )
    suffix = f"-{quantize}bit" if quantize else (f"-{dtype}" if dtype else "")
    name = validate_name(name or (src.default_name + suffix), "model name")
    steps: list[str] = []

    def step(text: str) -> None:
        steps.append(text)
        log.info(text)
        if on_step:
            on_step(text)

    wanted = {
        "source": src.value if src.kind == "hf" else (src.entry.name if src.entry else src.value),
        "kind": src.kind,
        "revision": revision,
        "quantize": quantize,
        "converted_dtype": dtype,
    }
    folder = _folder(ws, name)
    reg = ws.registry()
    row = reg.get("models", name=name)
    if row is not None and not (folder / "config.json").is_file() and not folder.exists():
        reg.delete("models", name=name)  # its folder was deleted by hand: pull it afresh
        row = None
    if row is not None or folder.exists() or (ws.models_dir / name).is_symlink():
        manifest = folder / MODEL_MANIFEST
        present = json.loads(manifest.read_text()) if manifest.is_file() else (row["meta"] if row else {})
        same = all(present.get(k) == v for k, v in wanted.items())
        if same and (folder / "config.json").is_file():
            if row is None:  # e.g. in the shared cache from another workspace: adopt it
                record = ModelRecord(**{**present, "name": name, "path": str(folder)})
                reg.upsert(
                    "models", {"name": name}, source=record.source, meta=record.model_dump(exclude={"name"})
                )
                _link_into_workspace(ws, name, folder)
                step(f"found {name} in {folder.parent}; registered it in this workspace")
            else:
                step(f"{name} is already pulled ({folder})")
            return PullResult(model=get_model(ws, name), already_present=True, steps=steps)
        raise FtError(
            ErrorCode.ALREADY_EXISTS,
            f"a model named {name!r} already exists (from {present.get('source', 'an unknown source')})",
            f"choose another name with --name, or remove it first: ft models rm {name} --yes",
        )

    root = folder.parent
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)
    convert = quantize is not None or dtype is not None
    meta: dict[str, Any] = {
        **wanted,
        "name": name,
        "commit": None,
        "trust_remote_code": trust_remote_code,
        "pulled_at": _now(),
    }

    from ft.models.convert import convert as convert_folder
    from ft.models.convert import copy_model_files
    from ft.models.gguf_import import import_gguf

    described: list[ModelRecord] = []  # what finish() found, so gigabytes are hashed once

    def finish(tmp: Path, from_dir: Path | None) -> None:
        if from_dir is not None:
            if convert:
                step(
                    f"converting ({'quantize ' + str(quantize) + '-bit' if quantize else ''}"
                    f"{' ' if quantize and dtype else ''}{'dtype ' + dtype if dtype else ''})"
                )
                convert_folder(
                    from_dir, tmp, quantize=quantize, dtype=dtype, trust_remote_code=trust_remote_code
                )
            else:
                copy_model_files(from_dir, tmp, with_code=trust_remote_code)
        step("checking every weight name and shape against the architecture")
        _verify_loadable(tmp, trust_remote_code)
        step("hashing weights (sha256)")
        record = _describe(tmp, meta)
        atomic_write_json(tmp / MODEL_MANIFEST, record.model_dump(exclude={"path", "name"}))
        described.append(record)

    if src.kind in ("embedded", "gguf"):
        from ft.models.embedded import embedded_gguf_path

        gguf = embedded_gguf_path() if src.kind == "embedded" else Path(src.value)
        with atomic_dir(folder) as tmp:
            if convert:
                scratch = root / f"{STAGING_PREFIX}{name}-gguf"
                shutil.rmtree(scratch, ignore_errors=True)
                step(f"importing {gguf.name}")
                import_gguf(gguf, scratch)
                try:
                    finish(tmp, scratch)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            else:
                step(f"importing {gguf.name} (weights kept quantized as stored)")
                import_gguf(gguf, tmp, overwrite=True)
                finish(tmp, None)
    elif src.kind == "local_dir":
        from ft.models.architectures import architecture_of
        from ft.models.inspect import check_loadable_folder

        local = Path(src.value)
        check_loadable_folder(local)
        architecture_of(
            json.loads((local / "config.json").read_text()),
            where=str(local / "config.json"),
            trust_remote_code=trust_remote_code,
        )
        step(f"copying {local}")
        with atomic_dir(folder) as tmp:
            finish(tmp, local)
    else:
        from ft.config.secrets import load_secrets
        from ft.models.hub import pull_repo

        secret = load_secrets(ws).hf_token
        staging = root / f"{STAGING_PREFIX}{name}"
        step(f"downloading {src.value}" + (f" at {revision}" if revision else "") + f" into {staging}")
        try:
            hub = pull_repo(
                src.value,
                staging,
                revision=revision,
                token=secret.get_secret_value() if secret else None,
                trust_remote_code=trust_remote_code,
                tqdm_class=tqdm_class,
            )
        except FtError:
            # Keep finished files for the next attempt; a staging folder with nothing in it is just clutter.
            if not any(
                p.is_file() for p in staging.rglob("*") if ".cache" not in p.relative_to(staging).parts
            ):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        meta["commit"] = hub.commit
        step(f"downloaded {len(hub.files)} files at commit {hub.commit[:12]}")
        if convert:
            with atomic_dir(folder) as tmp:
                finish(tmp, staging)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            # No copy of gigabytes: the staging folder itself becomes the model folder.
            shutil.rmtree(staging / ".cache", ignore_errors=True)
            finish(staging, None)
            os.replace(staging, folder)

    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    record = described[-1].model_copy(update={"path": str(folder), "size_bytes": size})
    _link_into_workspace(ws, name, folder)
    reg.upsert("models", {"name": name}, source=record.source, meta=record.model_dump(exclude={"name"}))
    step(f"registered {name}")
    return PullResult(model=get_model(ws, name), already_present=False, steps=steps)


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
    return MemoryReport(**est.__dict__, config_path=str(resolved.path) if resolved.path else None)


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
