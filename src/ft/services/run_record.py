"""What a run records about itself, typed: its snapshot (``config.json``) and its registry record.

* :class:`RunSnapshot` is ``runs/<id>/config.json`` and each checkpoint's ``config.json``: the resolved
  train.yml, where each value came from, the dataset and the model folder. Resume, `ft evaluate` and
  `ft serve` read a run's settings from it (never from raw dicts).
* :class:`RunRecord` is the ``meta`` of the run's row in the registry (table ``runs``): progress,
  losses, how it ended, its resumes. `ft train` writes it, `ft runs` and resume read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ft.config.train import TrainConfig
from ft.engine.trainer import STOP_DIVERGED, STOP_EARLY, STOP_INTERRUPTED
from ft.errors import ErrorCode, FtError
from ft.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

TABLE = "runs"


class DatasetRef(BaseModel):
    name: str
    version: int
    path: str | None = None


class RunSnapshot(BaseModel):
    """The settings a run trained with (``config.json`` in the run folder and in every checkpoint)."""

    model_config = ConfigDict(extra="allow")

    config: TrainConfig = Field(default_factory=TrainConfig)
    sources: dict[str, str] = Field(default_factory=dict)
    dataset: DatasetRef | None = None
    model_dir: str | None = None
    ft_version: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_removed_keys(cls, data: Any) -> Any:
        """A snapshot written before output.dir was removed still reads (the key was never used)."""
        if isinstance(data, dict) and isinstance(data.get("config"), dict) and "output" in data["config"]:
            data = {**data, "config": {k: v for k, v in data["config"].items() if k != "output"}}
        return data

    @classmethod
    def read(cls, path: Path) -> RunSnapshot:
        """The snapshot in ``path``; FtError (checkpoint_invalid) when it is missing or unreadable."""
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except (OSError, ValueError, ValidationError) as e:
            raise FtError(
                ErrorCode.CHECKPOINT_INVALID,
                f"{path}: cannot read the run's settings ({type(e).__name__}: {str(e).splitlines()[0]})",
                "this run cannot be resumed; start a new one with ft train",
            ) from None

    @classmethod
    def find(cls, *paths: Path) -> RunSnapshot | None:
        """The first readable snapshot of ``paths`` (None when none is: an old or foreign run)."""
        for p in paths:
            if p.is_file():
                try:
                    return cls.read(p)
                except FtError as e:
                    log.warning("%s", e.message)
        return None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class ResumeEntry(BaseModel):
    model_config = ConfigDict(validate_by_name=True, serialize_by_alias=True)

    at: str
    from_: str | None = Field(
        default=None, validation_alias=AliasChoices("from", "from_"), serialization_alias="from"
    )
    step: int = 0
    forced_differences: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class RunHeadline(BaseModel):
    """The fields of a run's record that `ft runs` lists (:class:`RunRecord` holds them, ``RunSummary`` shows
    them): declared once, here."""

    model: str | None = None
    dataset: str | None = None
    method: str | None = None
    step: int | None = None
    total_steps: int | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    train_seconds: float | None = None
    study: str | None = None
    """The `ft tune` study this run is a trial of."""


class RunRecord(RunHeadline):
    """A run's registry ``meta``: written by `ft train` as it goes, read by `ft runs` and resume."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    dataset_version: int | None = None
    objective: str | None = None
    """sft, kto, dpo or orpo."""
    init_from: str | None = None
    """The checkpoint the run started from (--init-from RUN)."""
    init_from_run: str | None = None
    config_hash: str | None = None
    precision: str | None = None
    pid: int | None = None
    host: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    trainable_parameters: int | None = None
    last_loss: float | None = None
    evals: list[list[float]] = Field(default_factory=list)
    """[step, validation loss] of every evaluation so far."""
    first_val_loss: float | None = None
    final_val_loss: float | None = None
    ranks: int | None = None
    """Data-parallel processes the run trained with (None: one)."""
    wall_seconds: float | None = None
    tokens: int | None = None
    trained_tokens: int | None = None
    tokens_per_second: float | None = None
    skipped_steps: int | None = None
    status_detail: str | None = None
    stop_reason: str | None = None
    error: str | None = None
    warnings: list[str] = Field(default_factory=list)
    resumes: list[ResumeEntry] = Field(default_factory=list)

    @classmethod
    def of(cls, row: dict[str, Any] | None) -> RunRecord:
        """The record of a registry row (an empty record for a run with no row)."""
        try:
            return cls.model_validate((row or {}).get("meta") or {})
        except ValidationError as e:  # a row written by another version: keep what can be read
            log.warning("run %s: registry record partly unreadable (%s)", (row or {}).get("id"), e)
            return cls()

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def process_alive(self) -> bool | None:
        """Whether the recorded training process still runs (None: not known here: no pid, another host)."""
        if self.pid is None or self.host != socket.gethostname():
            return None
        return pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def new_run_id(ws: Workspace, name: str | None) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{name}" if name else stamp
    run_id, k = base, 1
    while ws.run_dir(run_id).exists() or ws.registry().get(TABLE, id=run_id) is not None:
        k += 1
        run_id = f"{base}-{k}"
    return validate_name(run_id, "run id")


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def status_of(stopped: str) -> str:
    """The registry status of a run that ended with ``stopped`` (TrainResult.stopped)."""
    return {
        "completed": "completed",
        STOP_EARLY: "early-stopped",
        STOP_INTERRUPTED: "interrupted",
        STOP_DIVERGED: "failed",
        "pruned": "pruned",  # ft tune's pruner stopped the trial (services/tune.STOP_PRUNED)
    }.get(stopped, "stopped")
