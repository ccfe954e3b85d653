"""The dashboard's request bodies, and the results the CLI has no model for (the others are the
services' own: what `ft ... --json` prints)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from ft.config.train import DataSection
from ft.services import eval_report as evaluation_svc
from ft.services import runs as runs_svc
from ft.services.dataset_prepare import DATA_OPTIONS
from ft.ui.jobs import Job


# -- request bodies -----------------------------------------------------------------------------------
class TrainStart(BaseModel):
    dataset: str | None = None
    name: str | None = None
    set: list[str] = Field(default_factory=list)
    """--set overrides, section.key=value."""


class _PrepareArgs(BaseModel):
    """What `ft dataset prepare` takes beside train.yml's data section."""

    source: str
    """A file under the workspace (as uploaded: data/NAME) or a Hugging Face dataset id."""
    name: str | None = None
    model: str | None = None
    show_content: bool = False
    hf_split: str | None = None
    hf_config: str | None = None


def _data_option_type(key: str) -> Any:
    """The body's type for the data option of train.yml key ``key``: numbers stay numbers (``max_bad`` also
    takes "5%", as --max-bad does); choices and paths are strings, which the job's `ft` checks."""
    annotation = DataSection.model_fields[key].annotation
    if key == "max_bad":
        return str | float | None
    return (annotation if annotation in (int, float) else str) | None


# The body of POST /api/datasets/prepare: the arguments above and one field per option of `ft dataset prepare`
# that sets a key of train.yml's data section, named as its flag (--max-seq-length: max_seq_length, --val: val).
# Built from the one table of those options, so a new data option reaches the dashboard without a copy here.
_DATA_FIELDS: dict[str, Any] = {
    flag.removeprefix("--").replace("-", "_"): (_data_option_type(key), None)
    for key, flag in DATA_OPTIONS.items()
}
PrepareStart = create_model("PrepareStart", __base__=_PrepareArgs, **_DATA_FIELDS)


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
