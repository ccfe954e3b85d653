"""Datasets in the workspace: where each version is, lookup by ``NAME[@vN]``, `ft dataset rm`, the tokenizer.

A prepared dataset lives in ``datasets/<name>/v<version>/`` (splits, manifest.json, stats.json,
rejected.jsonl, lengths.png) and in the workspace registry (table ``datasets``, key name+version,
``meta.path`` = the folder relative to the workspace). Nothing is overwritten: a version folder appears
complete (atomic rename) or not at all. Preparing is ``ft.services.dataset_prepare``; list, info and show
are ``ft.services.dataset_inspect``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

import ft.models  # noqa: F401  (sets up transformers quietly: no "PyTorch was not found" advisory)
from ft.data.prepare import STATS
from ft.data.stats import DatasetStats
from ft.data.store import split_path
from ft.data.tokenize import TextTokenizer
from ft.errors import ErrorCode, FtError
from ft.workspace import Workspace, validate_name

TABLE = "datasets"
MANIFEST = "manifest.json"
FAILED = ".failed"  # datasets/.failed/NAME/: the report of NAME's last failed prepare
SPLITS = ("train", "val", "test")


class RemoveResult(BaseModel):
    name: str
    removed_versions: list[int]
    removed_leftovers: list[str] = Field(default_factory=list)
    """Folders of failed or interrupted prepares that were removed (relative to the workspace)."""


class ResolvedDataset(BaseModel):
    """Where a prepared dataset's files are (for the training service)."""

    name: str
    version: int
    path: Path
    splits: dict[str, Path]
    manifest: dict[str, Any]
    note: str | None = None
    """Set when a bare NAME picked the newest of several versions (say so to the user)."""


# ---------------------------------------------------------------------------------------- registry
def version_rows(ws: Workspace, name: str) -> list[dict[str, Any]]:
    """NAME's registry rows, oldest version first."""
    return sorted(ws.registry().list(TABLE, name=name), key=lambda r: int(r["version"]))


def version_folder(ws: Workspace, row: dict[str, Any]) -> Path:
    rel = row["meta"].get("path") or f"datasets/{row['name']}/v{row['version']}"
    return (ws.root / rel).resolve()


def version_row(ws: Workspace, name: str, version: int | None) -> dict[str, Any]:
    """NAME's row for ``version`` (the newest when None); a clear error when there is none."""
    validate_name(name, "dataset name")
    rows = version_rows(ws, name)
    if not rows:
        known = sorted({r["name"] for r in ws.registry().list(TABLE)})
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"no dataset named {name!r} in this workspace"
            + (f" (have: {', '.join(known)})" if known else ""),
            "prepare it with: ft dataset prepare SOURCE --name " + name,
        )
    if version is None:
        return rows[-1]
    for r in rows:
        if int(r["version"]) == version:
            return r
    raise FtError(
        ErrorCode.NOT_FOUND,
        f"dataset {name!r} has no version {version}",
        f"versions: {', '.join(str(r['version']) for r in rows)}",
    )


def register(
    ws: Workspace,
    name: str,
    version: int,
    folder: Path,
    source: str,
    manifest: dict[str, Any],
    stats: DatasetStats,
) -> None:
    ws.registry().upsert(
        TABLE,
        {"name": name, "version": version},
        source=source,
        meta={
            "path": folder.relative_to(ws.root).as_posix(),
            "cache_key": manifest.get("cache_key"),
            "model": manifest.get("tokenizer", {}).get("model", ""),
            "template": manifest.get("template", {}).get("name"),
            "records": {s: v.records for s, v in stats.splits.items()},
            "kept": stats.kept,
        },
    )


def reconcile(ws: Workspace, name: str, base: Path) -> None:
    """Register complete version folders the registry lacks (a process stopped between rename and insert)."""
    if not base.is_dir():
        return
    known = {int(r["version"]) for r in version_rows(ws, name)}
    for folder in base.glob("v*"):
        if not folder.name[1:].isdigit() or int(folder.name[1:]) in known:
            continue
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            stats = DatasetStats.model_validate_json((folder / STATS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        register(ws, name, int(folder.name[1:]), folder, manifest.get("source", ""), manifest, stats)


def next_version(ws: Workspace, name: str, base: Path) -> int:
    known = [int(r["version"]) for r in version_rows(ws, name)]
    known += [int(p.name[1:]) for p in base.glob("v*") if p.name[1:].isdigit()]
    return max(known, default=0) + 1


def failed_dir(ws: Workspace, name: str) -> Path:
    """Where the report of NAME's last failed prepare is kept (removed by `ft dataset rm NAME`)."""
    return ws.datasets_dir / FAILED / name


def drop_if_empty(folder: Path) -> None:
    """Remove ``folder`` when nothing is in it (another process's work in progress is left alone)."""
    try:
        folder.rmdir()
    except OSError:
        pass


# ------------------------------------------------------------------------------------------ lookup
def resolve_dataset(ws: Workspace, name: str, version: int | None = None) -> ResolvedDataset:
    """A prepared dataset's folder and split files (latest version unless ``version``)."""
    row = version_row(ws, name, version)
    folder = version_folder(ws, row)
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"dataset {name} v{row['version']}: {folder} is missing or incomplete",
            f"remove it with `ft dataset rm {name} --version {row['version']}` and prepare it again",
        )
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    splits = {s: split_path(folder, s) for s in SPLITS if split_path(folder, s).is_file()}
    return ResolvedDataset(
        name=name, version=int(row["version"]), path=folder, splits=splits, manifest=manifest
    )


def parse_dataset_ref(spec: str, option: str = "--dataset") -> tuple[str, int | None]:
    """``NAME`` -> (NAME, None); ``NAME@vN`` or ``NAME@N`` -> (NAME, N)."""
    name, at, ver = spec.partition("@")
    validate_name(name, "dataset name")
    if not at:
        return name, None
    try:
        version = int(ver[1:] if ver[:1] in ("v", "V") else ver)
    except ValueError:
        version = 0
    if version < 1:
        raise FtError(
            ErrorCode.USAGE,
            f"{option} {spec!r}: the version after '@' must be a positive number",
            f"e.g. {option} {name}@v1 (versions: ft dataset info {name})",
        )
    return name, version


def named_version(name: str, version: int | None) -> tuple[str, int | None]:
    """NAME and --version, or NAME@vN (both only when they agree)."""
    base, ref = parse_dataset_ref(name, "NAME")
    if ref is not None and version is not None and ref != version:
        raise FtError(ErrorCode.USAGE, f"{name} and --version {version} name different versions", "give one")
    return base, ref if ref is not None else version


def resolve_dataset_ref(ws: Workspace, spec: str, version: int | None = None) -> ResolvedDataset:
    """A dataset named as the user typed it (``NAME`` or ``NAME@vN``; ``version`` wins if given).

    A bare NAME takes the newest version; when there are several, ``note`` says which was taken.
    """
    name, ref_version = parse_dataset_ref(spec)
    explicit = version if version is not None else ref_version
    resolved = resolve_dataset(ws, name, explicit)
    if explicit is None:
        versions = [int(r["version"]) for r in version_rows(ws, name)]
        if len(versions) > 1:
            older = ", ".join(f"{name}@v{v}" for v in versions if v != resolved.version)
            resolved.note = (
                f"dataset {name} has {len(versions)} versions: using v{resolved.version}, the newest; "
                f"name another one with --dataset {older}"
            )
    return resolved


# ---------------------------------------------------------------------------------------------- rm
def remove_dataset(ws: Workspace, name: str, version: int | None = None) -> RemoveResult:
    """Delete one version (or all versions) of a dataset: its folder and its registry rows.

    Without ``version`` it also removes what a failed or interrupted prepare left under NAME (a
    folder with no registered version, the last failure's report), even when NAME has no version.
    """
    name, version = named_version(name, version)
    rows = [version_row(ws, name, version)] if version is not None else version_rows(ws, name)
    base = ws.dataset_dir(name)
    failed = failed_dir(ws, name)
    leftovers = [p for p in (base, failed) if p.exists()] if version is None else []
    if not rows and not leftovers:
        version_row(ws, name, None)  # raises the not-found error
    reg = ws.registry()
    removed = []
    for r in rows:
        folder = version_folder(ws, r)
        if folder.is_dir() and ws.datasets_dir.resolve() in folder.parents:
            shutil.rmtree(folder)
        reg.delete(TABLE, name=name, version=r["version"])
        removed.append(int(r["version"]))
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    drop_if_empty(ws.datasets_dir / FAILED)
    return RemoveResult(
        name=name,
        removed_versions=removed,
        removed_leftovers=[p.relative_to(ws.root).as_posix() for p in leftovers if not rows or p == failed],
    )


# --------------------------------------------------------------------------------------- tokenizer
def model_folder(ws: Workspace, model: str) -> Path:
    """The folder holding the model's tokenizer: a pulled model's, or a local folder path."""
    candidates: list[Path] = []
    try:
        candidates.append(ws.model_dir(model))
    except FtError:
        pass  # not a plain name (e.g. a repo id or a path)
    p = Path(model).expanduser()
    candidates += [p if p.is_absolute() else ws.root / p]
    for c in candidates:
        if (c / "tokenizer.json").is_file() or (c / "tokenizer_config.json").is_file():
            return c
    raise FtError(
        ErrorCode.NOT_FOUND,
        f"model {model!r} is not in this workspace, so its tokenizer and chat template are not available",
        f"pull it first: ft models pull {model}",
    )


def load_tokenizer(folder: Path, model: str) -> TextTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a broken tokenizer folder
        raise FtError(
            ErrorCode.MODEL_INVALID,
            f"cannot load the tokenizer of {model} from {folder}: {e}",
            f"pull the model again: ft models pull {model}",
        ) from None
    return TextTokenizer.from_hf(tok, name=model)


def check_tokenizer(manifest: dict[str, Any], dataset: str, model: str, model_dir: Path, hint: str) -> None:
    """Token ids only mean something with the tokenizer that made them: the one rule for train and evaluate.

    A dataset prepared for ``model`` fits; one prepared for another model fits only when both tokenizers
    have the same fingerprint (a dataset that recorded no fingerprint cannot show that, and is refused).
    A manifest without any tokenizer record (prepared by an early ft) is taken as it is.
    """
    tk = manifest.get("tokenizer") or {}
    if not tk or tk.get("model") == model:
        return
    if tk.get("fingerprint") != load_tokenizer(model_dir, model).fingerprint():
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"dataset {dataset} was tokenized for {tk.get('model')!r}, not for {model!r} (their tokenizers differ)",
            hint,
        )
