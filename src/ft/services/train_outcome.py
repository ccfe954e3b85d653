"""A training run as `ft train` holds it (:class:`Run`): its records, its objective's arguments (the cached
preference reference), and how it ends: status, error, plot, record, result."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ft import __version__
from ft.engine.callbacks import LogWriter
from ft.engine.trainer import (
    TrainerState,
    TrainResult,
    oom_hint,
)
from ft.errors import ErrorCode, FtError
from ft.services import models as models_svc
from ft.services import preference as pref_svc
from ft.services.resume import Resume
from ft.services.run_record import (
    RunRecord,
    config_hash,
    now,
    status_of,
)
from ft.services.runs import plot_metrics
from ft.services.tracking import RegistryTracker
from ft.services.train_setup import (
    Setup,
    TrainPlan,
)
from ft.workspace import Workspace
from ft.workspace.run_folder import (
    BEST,
    CHECKPOINTS,
    LATEST,
    METRICS,
    PLOT,
    TRAIN_LOG,
    pointer_name,
)

log = logging.getLogger("ft.services.training")


# ----------------------------------------------------------------------------------------- a run's records
def adapter_config(ws: Workspace, s: Setup, run_id: str) -> dict[str, Any]:
    """What each checkpoint's adapter_config.json says: the base model (with its files' sha256) and the spec."""
    try:
        sha = models_svc.get_model(ws, s.cfg.model.name).sha256
    except FtError:
        sha = {}
    return {
        "base_model": s.cfg.model.name,
        "base_model_dir": str(s.model_dir),
        "base_model_sha256": sha,
        **s.spec.to_json(),
        "model_type": getattr(getattr(s.model, "args", None), "model_type", None),
        "ft_version": __version__,
        "run_id": run_id,
    }


def start_record(row: dict[str, Any] | None, s: Setup, plan: TrainPlan) -> RunRecord:
    """The run's registry record as training starts (a resumed run keeps its history)."""
    record = RunRecord.of(row)
    return record.model_copy(
        update={
            "model": s.cfg.model.name,
            "dataset": s.dataset.name,
            "dataset_version": s.dataset.version,
            "method": s.cfg.training.method,
            "objective": s.cfg.training.objective,
            "init_from": s.init_from,
            "config_hash": config_hash(s.cfg),
            "total_steps": plan.total_steps,
            "trainable_parameters": plan.trainable_parameters,
            "precision": s.precision,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": record.started_at or datetime.now().isoformat(timespec="seconds"),
            "step": record.step or 0,
            "finished_at": None,
            "stop_reason": None,
            "error": None,
        }
    )


class TrainRunResult(BaseModel):
    run_id: str
    name: str | None
    status: str
    path: str
    plan: TrainPlan
    steps: int
    first_val_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    best_checkpoint: str | None
    latest_checkpoint: str | None
    train_seconds: float
    wall_seconds: float
    tokens: int
    trained_tokens: int
    tokens_per_second: float
    metrics_file: str
    log_file: str
    plot_file: str | None
    warnings: list[str] = Field(default_factory=list)
    stop_reason: str = "completed"
    skipped_steps: int = 0
    resumed_from: str | None = None
    """The checkpoint a resumed run continued from (None for a new run)."""
    notes: list[str] = Field(default_factory=list)
    """What a resume decided: damaged checkpoints set aside, leftovers removed, settings changed."""


@dataclass
class Run:
    """One run being trained: what :func:`run_training` opens, trains and finishes."""

    ws: Workspace
    run_id: str
    run_dir: Path
    name: str | None
    s: Setup
    plan: TrainPlan
    res: Resume | None
    snapshot: dict[str, Any]
    adapter_config: dict[str, Any]
    record: RunRecord
    optimizer: Any
    state: TrainerState
    started: float
    notes: list[str]


def outcome(run: Run, result: TrainResult, signum: int | None) -> tuple[str, FtError | None]:
    """(registry status, the error to raise) of a run the engine returned from."""
    status = status_of(result.stopped)
    latest = pointer_name(run.run_dir / CHECKPOINTS, LATEST)
    if status == "interrupted":
        sig = signum or signal.SIGINT
        return status, FtError(
            ErrorCode.INTERRUPTED,
            f"{signal.Signals(sig).name}: run {run.run_id} stopped after step {run.state.step}; "
            f"checkpoint {latest or '-'} saved",
            f"continue it with: ft train --resume {run.run_id}",
            exit_code=128 + int(sig),
        )
    if status == "failed":
        return status, FtError(
            ErrorCode.TRAINING_DIVERGED,
            f"run {run.run_id} stopped: {run.state.consecutive_skips} steps in a row had a non-finite loss or "
            f"gradient (up to step {run.state.step}; their record ids are in {run.run_dir / TRAIN_LOG}); "
            f"last good checkpoint: {latest or 'none'}",
            "lower training.learning_rate, keep training.max_grad_norm on, or check those records; "
            f"then ft train --resume {run.run_id} --set ... --force",
        )
    return status, None


def out_of_memory(run: Run, e: BaseException) -> FtError:
    latest = pointer_name(run.run_dir / CHECKPOINTS, LATEST)
    return FtError(
        ErrorCode.OUT_OF_MEMORY,
        f"run {run.run_id} ran out of memory after step {run.state.step} ({e}); "
        f"last checkpoint: {latest or 'none'} (intact)",
        oom_hint(run.s.options) + f"; then ft train --resume {run.run_id} --set ... --force",
    )


def finish(run: Run, reg: RegistryTracker, status: str, result: TrainResult | None) -> Path | None:
    """Draw the curves and write the final registry record; returns the plot (None when it failed)."""
    plot_file: Path | None = run.run_dir / PLOT
    try:
        plot_metrics(run.run_dir / METRICS, run.run_dir / PLOT, title=f"{run.run_id} ({status})")
    except Exception as e:  # a plot must never hide the run's real outcome
        log.warning("could not draw %s: %s", PLOT, e)
        plot_file = None
    r = run.record
    r.status_detail = status
    r.finished_at = now()
    r.wall_seconds = round(time.perf_counter() - run.started, 2)
    if result is not None:
        st = result.state
        r.step, r.train_seconds = st.step, round(st.train_seconds, 2)
        r.tokens, r.trained_tokens = st.tokens_seen, st.trained_tokens_seen
        r.tokens_per_second = round(result.tokens_per_second, 1)
        if run.res is None or r.first_val_loss is None:
            r.first_val_loss = result.first_val_loss
        r.final_val_loss, r.best_val_loss, r.best_step = result.final_val_loss, st.best_val_loss, st.best_step
        r.skipped_steps = st.skipped_steps
        r.warnings = run.s.warnings + result.warnings
    reg.put(status=status)
    return plot_file


def result_of(run: Run, status: str, result: TrainResult, plot_file: Path | None) -> TrainRunResult:
    st = result.state
    ckpts = run.run_dir / CHECKPOINTS
    res = run.res
    return TrainRunResult(
        run_id=run.run_id,
        name=run.name,
        status=status,
        path=str(run.run_dir),
        plan=run.plan,
        steps=st.step,
        first_val_loss=run.record.first_val_loss,
        final_val_loss=result.final_val_loss,
        best_val_loss=st.best_val_loss,
        best_step=st.best_step,
        best_checkpoint=pointer_name(ckpts, BEST),
        latest_checkpoint=pointer_name(ckpts, LATEST),
        train_seconds=round(st.train_seconds, 2),
        wall_seconds=round(time.perf_counter() - run.started, 2),
        tokens=st.tokens_seen,
        trained_tokens=st.trained_tokens_seen,
        tokens_per_second=round(result.tokens_per_second, 1),
        metrics_file=str(run.run_dir / METRICS),
        log_file=str(run.run_dir / TRAIN_LOG),
        plot_file=str(plot_file) if plot_file else None,
        warnings=run.s.warnings + result.warnings,
        stop_reason=result.stopped,
        skipped_steps=st.skipped_steps,
        resumed_from=(res.checkpoint.name if res.checkpoint is not None else "step 0") if res else None,
        notes=run.notes,
    )


# ----------------------------------------------------------------------------------------- objectives
def objective_args(run: Run, logw: LogWriter | None) -> tuple[tuple[Any, Any], dict[str, Any]]:
    """(train and val data, the engine's preference arguments) of the run's training.objective
    (``logw`` None: a data-parallel rank other than 0, which writes nothing)."""
    s = run.s
    if s.pref is None:
        return (s.train_data, s.val_data), {}
    kw: dict[str, Any] = {"objective": s.pref.options}
    if s.pref.reference in ("adapters_off", "cached"):
        kw["reference"] = s.pref.reference
    if s.pref.reference == "cached":
        kw["ref_cache"] = _reference_cache(run, logw)
    return (s.pref.train, s.pref.val), kw


def _reference_cache(run: Run, logw: LogWriter | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The cached reference of a preference run (:mod:`ft.services.preference`): computed once with the
    starting weights, stored in the run folder, reused by --resume when its key matches (``logw`` None:
    read or computed, never written)."""
    from ft.engine.losses import check_model
    from ft.engine.preference import Units, compute_reference

    s = run.s
    assert s.pref is not None
    pref = s.pref
    b = s.options.batch
    key = pref_svc.cache_key(
        dataset=s.dataset.name,
        version=s.dataset.version,
        model=s.cfg.model.name,
        model_sha256=run.adapter_config.get("base_model_sha256"),
        init_from=s.init_from,
        objective=pref.options.objective,
        max_seq_length=b.max_seq_length,
        seed=b.seed,
        method=s.cfg.training.method,
    )

    def compute() -> tuple[np.ndarray, np.ndarray | None]:
        t0 = time.perf_counter()
        split = check_model(s.model)
        out: list[np.ndarray | None] = []
        for data in (pref.train, pref.val):
            if data is None:
                out.append(None)
                continue
            units = Units(data, pref.options, b.max_seq_length, b.seed)
            out.append(compute_reference(s.model, split, units, b, pad_id=s.options.pad_id))
        if logw is not None:
            logw.line(f"reference log-probabilities computed in {time.perf_counter() - t0:.1f}s")
        assert out[0] is not None
        return out[0], out[1]

    (train_ref, val_ref), loaded = pref_svc.load_or_compute_reference(
        run.run_dir, key, compute, write=logw is not None
    )
    if loaded and logw is not None:
        logw.line("reference log-probabilities loaded from reference.npz (same dataset, model and start)")
    return train_ref, val_ref
