"""Training runs: `ft runs list | show | plot`, read from the registry and each run's folder.

A run lives in ``runs/<id>/``: ``metrics.jsonl`` (one JSON object per logged step and evaluation),
``train.log``, ``config.json`` (the resolved train.yml), ``loss.png`` and ``checkpoints/``; its row in
the registry (table ``runs``) holds the status and a summary in ``meta``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ft.engine.callbacks import read_metrics
from ft.errors import ErrorCode, FtError
from ft.services.eval_report import EvaluationSummary, list_evaluations
from ft.services.run_record import TABLE, RunHeadline, RunRecord
from ft.workspace import Workspace
from ft.workspace.run_folder import (
    BEST,
    CHECKPOINTS,
    CONFIG,
    LATEST,
    METRICS,
    PLOT,
    TRAIN_LOG,
    pointer_name,
    step_folders,
)


class RunSummary(RunHeadline):
    """A row of `ft runs`: the run's registry row and its record's headline."""

    id: str
    name: str | None
    status: str
    created_at: str
    updated_at: str
    path: str
    detail: str | None = None
    """Why the status differs from the registry's (a `running` run whose process is gone is `interrupted`)."""


# What a run's summary shows of its record, under the same names.
_FROM_RECORD = set(RunSummary.model_fields) & set(RunRecord.model_fields)


class RunList(BaseModel):
    runs: list[RunSummary]


class RunDetail(BaseModel):
    summary: RunSummary
    meta: RunRecord
    checkpoints: list[str]
    best_checkpoint: str | None
    latest_checkpoint: str | None
    evals: list[dict[str, Any]] = Field(default_factory=list)
    reports: list[EvaluationSummary] = Field(default_factory=list)
    """`ft evaluate` reports of this run (base vs tuned), from the registry."""
    last_train: dict[str, Any] | None = None
    files: dict[str, str] = Field(default_factory=dict)


class PlotResult(BaseModel):
    run_id: str
    path: str
    train_points: int
    eval_points: int


def _summary(ws: Workspace, row: dict[str, Any]) -> RunSummary:
    m = RunRecord.of(row)
    status = row.get("status") or "unknown"
    detail = None
    if status == "running" and m.process_alive() is False:
        # Killed outright (SIGKILL, power loss): nobody could record it; it resumes like an interrupted run.
        status, detail = (
            "interrupted",
            "the training process ended without a word (killed?): ft train --resume",
        )
    return RunSummary(
        id=row["id"],
        name=row.get("name"),
        status=status,
        detail=detail,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        path=str(ws.run_dir(row["id"])),
        **m.model_dump(include=_FROM_RECORD),
    )


def list_runs(ws: Workspace, study: str | None = None) -> RunList:
    """Every run, oldest first; ``study``: only the trials of that `ft tune` study."""
    runs = [_summary(ws, r) for r in ws.registry().list(TABLE)]
    return RunList(runs=[r for r in runs if study is None or r.study == study])


def _row(ws: Workspace, run: str | None) -> dict[str, Any]:
    reg = ws.registry()
    rows = reg.list(TABLE)
    if not rows:
        raise FtError(ErrorCode.NOT_FOUND, f"no training runs in {ws.root}", "train one first: ft train")
    if run is None:
        return rows[-1]
    for r in reversed(rows):
        if r["id"] == run or r.get("name") == run:
            return r
    known = ", ".join(r["id"] for r in rows[-5:])
    raise FtError(
        ErrorCode.NOT_FOUND, f"no run {run!r} in {ws.root}", f"recent runs: {known} (see ft runs list)"
    )


def show_run(ws: Workspace, run: str | None = None) -> RunDetail:
    row = _row(ws, run)
    folder = ws.run_dir(row["id"])
    ckpts = folder / CHECKPOINTS
    metrics = read_metrics(folder / METRICS)
    evals = [
        {k: m.get(k) for k in ("step", "val_loss", "val_ppl", "is_best")}
        for m in metrics
        if m.get("type") == "eval"
    ]
    train = [m for m in metrics if m.get("type") == "train"]
    files = {n: str(folder / n) for n in (METRICS, TRAIN_LOG, PLOT, CONFIG) if (folder / n).is_file()}
    return RunDetail(
        summary=_summary(ws, row),
        meta=RunRecord.of(row),
        checkpoints=[p.name for p in step_folders(ckpts)],
        best_checkpoint=pointer_name(ckpts, BEST),
        latest_checkpoint=pointer_name(ckpts, LATEST),
        evals=evals,
        reports=list_evaluations(ws, row["id"]),
        last_train=train[-1] if train else None,
        files=files,
    )


def plot_metrics(metrics_file: Path, out: Path, title: str = "") -> tuple[int, int]:
    """Training loss, validation loss and learning rate against the step, as a PNG (preference runs: also
    rewards, margin and reward accuracy). Returns point counts."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: files only
    import matplotlib.pyplot as plt

    from ft.workspace.atomic import atomic_write_bytes

    rows = read_metrics(metrics_file)
    train = [(m["step"], m.get("avg_loss")) for m in rows if m.get("type") == "train" and m.get("logged")]
    train = [(s, v) for s, v in train if v is not None and math.isfinite(v)]
    evals = [
        (m["step"], m["val_loss"])
        for m in rows
        if m.get("type") == "eval" and math.isfinite(m.get("val_loss", math.nan))
    ]
    lrs = [(m["step"], m["lr"]) for m in rows if m.get("type") == "train" and m.get("logged")]
    # Preference objectives: rewards, margin and reward accuracy per logged step and evaluation.
    pref = {
        (kind, key): [
            (m["step"], m["metrics"][key])
            for m in rows
            if m.get("type") == kind
            and key in (m.get("metrics") or {})
            and math.isfinite(m["metrics"][key])
            and (kind == "eval" or m.get("logged"))
        ]
        for kind in ("train", "eval")
        for key in ("rewards_chosen", "rewards_rejected", "margin", "reward_accuracy")
    }
    pref = {k: v for k, v in pref.items() if v}
    if pref:
        fig, (ax, ax_pref, ax_lr) = plt.subplots(
            3, 1, figsize=(8, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1]}
        )
        colors = {"rewards_chosen": "tab:green", "rewards_rejected": "tab:red", "margin": "tab:purple"}
        ax_acc = ax_pref.twinx()
        for (kind, key), pts in pref.items():
            style = "o-" if kind == "eval" else "-"
            name = f"{'val ' if kind == 'eval' else ''}{key.replace('_', ' ')}"
            target = ax_acc if key == "reward_accuracy" else ax_pref
            target.plot(
                *zip(*pts, strict=True), style, label=name, color=colors.get(key, "tab:gray"), alpha=0.8
            )
        ax_pref.set_ylabel("reward")
        ax_acc.set_ylabel("reward accuracy")
        ax_acc.set_ylim(0, 1)
        ax_pref.grid(alpha=0.3)
        ax_pref.legend(fontsize=7, loc="upper left")
        ax_acc.legend(fontsize=7, loc="lower right")
    else:
        fig, (ax, ax_lr) = plt.subplots(
            2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss", color="tab:orange")
        best = min(evals, key=lambda e: e[1])
        ax.annotate(
            f"best {best[1]:.3f} @ {best[0]}", best, textcoords="offset points", xytext=(5, 8), fontsize=8
        )
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    if lrs:
        ax_lr.plot(*zip(*lrs, strict=True), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(out), buf.getvalue())
    return len(train), len(evals)


def plot_run(ws: Workspace, run: str | None = None, out: Path | None = None) -> PlotResult:
    row = _row(ws, run)
    folder = ws.run_dir(row["id"])
    metrics = folder / METRICS
    if not metrics.is_file():
        raise FtError(
            ErrorCode.NOT_FOUND, f"run {row['id']} has no {METRICS} yet", "wait for its first logged step"
        )
    path = Path(out) if out else folder / PLOT
    n_train, n_eval = plot_metrics(metrics, path, title=f"{row['id']} ({row.get('status')})")
    return PlotResult(run_id=row["id"], path=str(path), train_points=n_train, eval_points=n_eval)
