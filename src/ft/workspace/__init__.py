"""The workspace: one folder holding train.yml, models/, datasets/, runs/ and the sqlite registry."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from ft.config.settings import load_settings
from ft.errors import ErrorCode, FtError
from ft.workspace.registry import Registry

TRAIN_YML = "train.yml"
PASSWORDS_YML = "passwords.yml"
DB_NAME = "ft.db"
MODELS = "models"
DATASETS = "datasets"
RUNS = "runs"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str, what: str = "name") -> str:
    """A name that is safe as one path component: letters, digits, '.', '_' and '-', no traversal."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in {".", ".."} or ".." in name:
        raise FtError(
            ErrorCode.NAME_INVALID,
            f"{what} {name!r} is not allowed",
            "use letters, digits, '.', '_' and '-' (up to 128 characters, no '..' and no '/')",
        )
    return name


class _Under:
    """A path directly under the workspace root, as an attribute of :class:`Workspace`."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, ws: None, owner: type) -> _Under: ...
    @overload
    def __get__(self, ws: Workspace, owner: type) -> Path: ...
    def __get__(self, ws: Workspace | None, owner: type) -> Path | _Under:
        return self if ws is None else ws.root / self.name


@dataclass(frozen=True)
class Workspace:
    """Paths of one workspace. Creating the object touches nothing on disk."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    train_yml = _Under(TRAIN_YML)
    passwords_yml = _Under(PASSWORDS_YML)
    models_dir = _Under(MODELS)
    datasets_dir = _Under(DATASETS)
    runs_dir = _Under(RUNS)
    db_path = _Under(DB_NAME)

    def model_dir(self, name: str) -> Path:
        return self.models_dir / validate_name(name, "model name")

    def dataset_dir(self, name: str) -> Path:
        return self.datasets_dir / validate_name(name, "dataset name")

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / validate_name(run_id, "run id")

    def registry(self) -> Registry:
        """The workspace's sqlite registry (created with its tables on first use)."""
        return Registry(self.db_path)

    def exists(self) -> bool:
        return self.train_yml.is_file()

    @classmethod
    def find(cls, explicit: Path | str | None = None, *, cwd: Path | None = None) -> Workspace:
        """``--workspace``, else ``FT_WORKSPACE``, else the nearest folder upwards holding train.yml."""
        if explicit is None:
            explicit = load_settings().workspace
        if explicit is not None:
            ws = cls(Path(explicit))
            if not ws.exists():
                raise FtError(
                    ErrorCode.WORKSPACE_NOT_FOUND,
                    f"{ws.root} is not an ft workspace (no {TRAIN_YML})",
                    f"create one with: ft init {ws.root}",
                )
            return ws
        here = Path(cwd or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if (folder / TRAIN_YML).is_file():
                return cls(folder)
        raise FtError(
            ErrorCode.WORKSPACE_NOT_FOUND,
            f"no ft workspace in {here} or any folder above it (looked for {TRAIN_YML})",
            "run `ft init` here, pass --workspace DIR, or set FT_WORKSPACE",
        )


__all__ = ["Workspace", "Registry", "validate_name", "TRAIN_YML", "PASSWORDS_YML", "DB_NAME"]
