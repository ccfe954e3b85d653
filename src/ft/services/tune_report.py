"""`ft tune`'s results: the trial table's rows, the best trial, its train.yml and the study's plots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from ft.config.loader import load_config
from ft.workspace import Workspace
from ft.workspace.atomic import atomic_write_text

BEST_YML = "best.yml"

TrialStatus = Literal["completed", "pruned", "failed", "interrupted", "running"]


def as_set(key: str, value: Any) -> str:
    """A sampled value as a `--set key=value` override (text quoted as JSON)."""
    import json

    return f"{key}={json.dumps(value) if isinstance(value, str) else repr(value)}"


class TrialRow(BaseModel):
    number: int
    status: TrialStatus
    params: dict[str, Any]
    value: float | None = None
    run_id: str | None = None
    seconds: float | None = None
    pruned_at_step: int | None = None
    error: str | None = None


class TuneProgress(BaseModel):
    """One event of a study: a trial starts or ends."""

    kind: Literal["start", "end"]
    trial: TrialRow
    done: int
    budget: int


class TuneResult(BaseModel):
    study: str
    objective: str
    direction: Literal["minimize", "maximize"]
    space: dict[str, dict[str, Any]]
    trials: list[TrialRow]
    best: TrialRow | None
    best_config: str | None
    plots: list[str]
    total_seconds: float
    stopped: str
    notes: list[str] = []


def best_trial(study: Any, rows: list[TrialRow]) -> TrialRow | None:
    done = [r for r in rows if r.status == "completed" and r.value is not None]
    if not done:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(done, key=lambda r: r.value)  # type: ignore[arg-type,return-value]


def write_best(ws: Workspace, out: Path, settings: dict[str, Any], best: TrialRow) -> Path:
    """The configuration to train with (`ft train --config` takes it): train.yml's values, the best trial's on top."""
    config_path = Path(settings["config_path"]) if settings.get("config_path") else None
    sets = [*settings["overrides"], *(as_set(k, v) for k, v in best.params.items())]
    cfg = load_config(config_path if config_path is not None else ws, sets).config
    data = cfg.model_dump(mode="json", exclude={"tune"})
    header = [
        f"# Best configuration of study {out.name} (trial {best.number}, run {best.run_id}, "
        f"{settings['objective']} = {best.value:.6g}).",
        "# Train with it: ft train --config " + str(out.relative_to(ws.root) / BEST_YML),
        "# Searched keys, as found:",
        *(f"#   {k}: {v!r}" for k, v in best.params.items()),
        "",
    ]
    path = out / BEST_YML
    atomic_write_text(path, "\n".join(header) + yaml.safe_dump(data, sort_keys=False))
    return path


def plots(study: Any, out: Path, note: Callable[[str], None]) -> list[Path]:
    """Optimization history, parameter importances and slice plots as PNG (what optuna can draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    finished = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        return []
    written: list[Path] = []
    kinds: list[tuple[str, Callable[[], Any]]] = [
        ("history", lambda: ovm.plot_optimization_history(study)),
        ("slice", lambda: ovm.plot_slice(study)),
    ]
    if len(finished) >= 3:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        kinds.insert(1, ("importances", lambda: ovm.plot_param_importances(study, evaluator=evaluator)))
    import warnings

    for kind, draw in kinds:
        path = out / f"{kind}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(max(6.4, fig.get_size_inches()[0]), 4.8)
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            note(f"no {kind} plot: {e}")
    return written
