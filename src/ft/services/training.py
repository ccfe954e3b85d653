"""`ft train`: resolve config, dataset and model, run the engine into ``runs/<id>/``, record it.

The service wires the pieces; the engine (:mod:`ft.engine.trainer`) does the math and reports
through callbacks. Callers (the CLI) pass their own callbacks for a live display. Everything a run
produces is in its folder: ``metrics.jsonl``, ``train.log``, ``config.json``, ``loss.png`` and
``checkpoints/``; its registry row (table ``runs``) says how it went.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ft import __version__
from ft.engine.callbacks import LogWriter, MetricsWriter, TrainControl
from ft.engine.checkpoint import CheckpointSaver
from ft.engine.memory import MemoryMonitor, is_out_of_memory, simulate_out_of_memory_above
from ft.engine.trainer import (
    STOP_DIVERGED,
    STOP_EARLY,
    STOP_INTERRUPTED,
    TrainerState,
    TrainResult,
    oom_hint,
    train,
)
from ft.errors import ErrorCode, FtError
from ft.services import parallel
from ft.services import preference as pref_svc
from ft.services.resume import Resume, continue_run, plan_resume
from ft.services.run_record import (
    DatasetRef,
    RunRecord,
    RunSnapshot,
    new_run_id,
)
from ft.services.runs import plot_metrics
from ft.services.signals import Signals
from ft.services.tracking import LogHandler, RegistryTracker, trackers
from ft.services.train_setup import (
    Setup,
    TrainPlan,
    adapter_config,
    make_optimizer,
    plan_of,
    setup,
    start_record,
)
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_write_json
from ft.workspace.run_folder import (
    BEST,
    CHECKPOINTS,
    CONFIG,
    LATEST,
    METRICS,
    PLOT,
    TRAIN_LOG,
    pointer_name,
)

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------------------- run
@dataclass
class _Run:
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


def _open(
    ws: Workspace,
    overrides: Sequence[str],
    config_path: Path | None,
    dataset: str | None,
    name: str | None,
    prepare_progress: Callable[[Any], None] | None,
    resume: str | None,
    force: bool,
    note: Callable[[str], None],
    follow: str | None = None,
    init_from: str | None = None,
) -> _Run:
    """A new run folder, or the run to resume with its checkpoint loaded; its snapshot and record written.

    ``follow`` (data parallelism, ranks other than 0): the run rank 0 opened (``run_id``; its dataset as
    ``NAME@vN`` after a newline); nothing is written, the checkpoint of a resume is only loaded."""
    started = time.perf_counter()
    if follow is not None:
        run_id, _, dataset_ref = follow.partition("\n")
        resume = run_id if resume is not None else None
        dataset = dataset_ref if resume is None else None
    if name is not None:
        validate_name(name, "run name")
    res: Resume | None = None
    if resume is not None:
        if dataset:
            raise FtError(
                ErrorCode.USAGE,
                "--dataset cannot be combined with --resume: a run keeps its dataset",
                "drop --dataset",
            )
        res = plan_resume(ws, resume, overrides, config_path, force)
        for n in res.notes if follow is None else ():
            note(n)
        s = setup(
            ws,
            overrides,
            config_path,
            res.dataset,
            prepare_progress,
            resolved=res.resolved,
            dataset_version=res.dataset_version,
            init_from=RunRecord.of(res.row).init_from_run,
        )
        run_id, run_dir = res.run_id, res.run_dir
        name = res.row.get("name") if name is None else name
    elif follow is not None:
        s = setup(ws, overrides, config_path, dataset)
        run_dir = ws.run_dir(run_id)
    else:
        s = setup(ws, overrides, config_path, dataset, prepare_progress, init_from=init_from)
        run_id = new_run_id(ws, name)
        run_dir = ws.run_dir(run_id)
        run_dir.mkdir(parents=True)
    snapshot = RunSnapshot(
        config=s.cfg,
        sources=s.resolved.sources,
        dataset=DatasetRef(name=s.dataset.name, version=s.dataset.version, path=str(s.dataset.path)),
        model_dir=str(s.model_dir),
        ft_version=__version__,
    ).dump()
    if follow is None and (res is None or not (run_dir / CONFIG).is_file()):
        atomic_write_json(run_dir / CONFIG, snapshot)
    plan = plan_of(s)
    run = _Run(
        ws,
        run_id,
        run_dir,
        name,
        s,
        plan,
        res,
        snapshot,
        adapter_config(ws, s, run_id),
        start_record(res.row if res else None, s, plan).model_copy(
            update={"init_from_run": init_from if res is None else RunRecord.of(res.row).init_from_run}
        ),
        make_optimizer(s),
        TrainerState(),
        started,
        [],
    )
    if res is not None and follow is not None:
        if res.checkpoint is not None:  # rank 0 trimmed the metrics and recorded the resume
            from ft.engine.checkpoint import load_checkpoint

            run.state = TrainerState.from_json(load_checkpoint(res.checkpoint, run.s.model, run.optimizer))
    elif res is not None:
        run.state = continue_run(res, run.s.model, run.optimizer, run.plan.total_steps, run.record)
    return run


def _log_start(run: _Run, logw: LogWriter) -> None:
    res, s = run.res, run.s
    if res is not None:
        logw.line(
            f"resume of run {run.run_id} from {res.checkpoint.name if res.checkpoint else 'step 0'} "
            f"(step {run.state.step} of {run.plan.total_steps})"
        )
        for n in res.notes:
            logw.line(f"resume: {n}")
    else:
        logw.line(
            f"run {run.run_id}: model {s.cfg.model.name} ({s.precision}), dataset {s.dataset.name} "
            f"v{s.dataset.version}, {s.summary.describe()}"
        )
    for w in s.warnings:
        logw.line(f"warning: {w}")


def _callbacks(
    run: _Run, logw: LogWriter, reg: RegistryTracker, control: TrainControl, extra: Sequence[object]
) -> list[object]:
    """The run's callbacks, in order: the memory monitor fills in events the others report."""
    hooks: list[object] = []
    before_rename = None
    if os.environ.get("FT_TEST_HOOK"):  # ft's own tests only: the fault-injection module is loaded on demand
        from ft.testing.faults import from_env

        th = from_env(run.s.model, control)
        hooks.append(th)
        before_rename = th.before_rename
    cfg = run.s.cfg
    saver = CheckpointSaver(
        run.run_dir / CHECKPOINTS,
        run.s.model,
        run.optimizer,
        run.state,
        cfg.training.save_steps,
        cfg.training.keep_last,
        run.adapter_config,
        run.snapshot,
        before_rename=before_rename,
    )
    if run.res is not None and run.res.checkpoint is not None:
        saver.mark_saved(run.state.step)  # already on disk
    return [
        MemoryMonitor(),
        MetricsWriter(run.run_dir / METRICS),
        logw,
        *hooks,
        saver,
        reg,
        *trackers(cfg, run.ws, run.run_dir, run.run_id, run.snapshot),
        *extra,
    ]


def _outcome(run: _Run, result: TrainResult, signum: int | None) -> tuple[str, FtError | None]:
    """(registry status, the error to raise) of a run the engine returned from."""
    status = _status_of(result.stopped)
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


def _out_of_memory(run: _Run, e: BaseException) -> FtError:
    latest = pointer_name(run.run_dir / CHECKPOINTS, LATEST)
    return FtError(
        ErrorCode.OUT_OF_MEMORY,
        f"run {run.run_id} ran out of memory after step {run.state.step} ({e}); "
        f"last checkpoint: {latest or 'none'} (intact)",
        oom_hint(run.s.options) + f"; then ft train --resume {run.run_id} --set ... --force",
    )


def _finish(run: _Run, reg: RegistryTracker, status: str, result: TrainResult | None) -> Path | None:
    """Draw the curves and write the final registry record; returns the plot (None when it failed)."""
    plot_file: Path | None = run.run_dir / PLOT
    try:
        plot_metrics(run.run_dir / METRICS, run.run_dir / PLOT, title=f"{run.run_id} ({status})")
    except Exception as e:  # a plot must never hide the run's real outcome
        log.warning("could not draw %s: %s", PLOT, e)
        plot_file = None
    r = run.record
    r.status_detail = status
    r.finished_at = _now()
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


def run_training(
    ws: Workspace,
    overrides: Sequence[str] = (),
    config_path: Path | None = None,
    dataset: str | None = None,
    name: str | None = None,
    callbacks: Sequence[object] = (),
    prepare_progress: Callable[[Any], None] | None = None,
    on_plan: Callable[[TrainPlan, str], None] | None = None,
    control: TrainControl | None = None,
    *,
    resume: str | None = None,
    force: bool = False,
    on_note: Callable[[str], None] | None = None,
    study: str | None = None,
    init_from: str | None = None,
) -> TrainRunResult:
    """Train as train.yml (+ overrides) says, into a new ``runs/<id>/``; see the module docstring.

    ``resume``: continue a run instead ('' = the latest run; a run id or name; a run or checkpoint
    folder) from its newest intact checkpoint, with the run's own settings (``overrides`` on top: a
    change to the math is refused unless ``force``). ``on_note`` receives what the resume decided.
    ``init_from``: start from that run's best (else latest) checkpoint (e.g. KTO after SFT).
    ``study``: the `ft tune` study this run is a trial of (kept in the registry; `ft runs list --study`).
    """
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        log.info("%s", text)
        if on_note:
            on_note(text)

    dp = parallel.join()
    if dp is not None and not dp.is_main:
        return _follow(ws, dp, overrides, config_path, resume, force, control)
    run = _open(
        ws, overrides, config_path, dataset, name, prepare_progress, resume, force, note, init_from=init_from
    )
    if dp is not None and run.s.pref is not None:
        raise FtError(
            ErrorCode.USAGE,
            f"training.objective {run.s.cfg.training.objective} trains in one process (data-parallel runs are SFT only)",
            "drop --nproc/--hostfile (or distributed.nproc) for this run",
        )
    run.notes = notes
    if dp is not None:
        parallel.lead(dp, run)
    parallel.record_ranks(run, dp.size if dp is not None else 1, note)
    if study is not None:
        run.record.study = study
    control = control or TrainControl()
    reg = RegistryTracker(ws, run.run_id, run.record)
    reg.put(name=run.name, status="running")
    if on_plan:
        on_plan(run.plan, run.run_id)
    logw = LogWriter(run.run_dir / TRAIN_LOG)
    _log_start(run, logw)
    handler = LogHandler(logw)
    ft_log = logging.getLogger("ft")
    ft_log.addHandler(handler)

    def first_signal(signum: int) -> None:
        with contextlib.suppress(Exception):  # the log may be closed already (signal during the final save)
            logw.line(f"{signal.Signals(signum).name}: finishing the current step, then saving and stopping")

    def second_signal(signum: int) -> None:
        run.record.status_detail = "interrupted"
        run.record.stop_reason = f"second {signal.Signals(signum).name}"
        run.record.finished_at = _now()
        reg.put(status="interrupted")
        with contextlib.suppress(Exception):  # the log may be closed already (signal during the final save)
            logw.line(
                f"second {signal.Signals(signum).name}: exited at once (the last complete checkpoint is kept)"
            )

    status, result, error = "failed", None, None
    signals = Signals(control, first_signal, second_signal)
    try:
        with signals:
            s = run.s
            data: tuple[Any, Any] = (s.train_data, s.val_data)
            pref_kw: dict[str, Any] = {}
            if s.pref is not None:
                data = (s.pref.train, s.pref.val)
                pref_kw["objective"] = s.pref.options
                if s.pref.reference in ("adapters_off", "cached"):
                    pref_kw["reference"] = s.pref.reference
                if s.pref.reference == "cached":
                    pref_kw["ref_cache"] = _reference_cache(run, logw)
            result = train(
                s.model,
                run.optimizer,
                *data,
                s.options,
                callbacks=_callbacks(run, logw, reg, control, callbacks),
                control=control,
                state=run.state,
                decode=getattr(s.tokenizer, "decode", None),
                **pref_kw,
            )
        status, error = _outcome(run, result, signals.signum)
        run.record.stop_reason = result.stopped
        if status == "failed" and error is not None:
            run.record.error = error.message
    except KeyboardInterrupt:
        status = "interrupted"
        logw.line("interrupted by the user")
        raise FtError(
            ErrorCode.INTERRUPTED,
            f"training interrupted; run {run.run_id} kept in {run.run_dir}",
            "checkpoints so far are in its checkpoints/ folder",
        ) from None
    except BaseException as e:
        failure = _out_of_memory(run, e) if is_out_of_memory(e) else e
        if dp is not None and parallel.peer_lost(e):
            failure = parallel.lost(
                dp, run.run_id, run.state.step, pointer_name(run.run_dir / CHECKPOINTS, LATEST)
            )
        logw.line(f"failed: {type(e).__name__}: {e}")
        run.record.error = failure.message if isinstance(failure, FtError) else f"{type(e).__name__}: {e}"
        if failure is not e:
            raise failure from None
        raise
    finally:
        ft_log.removeHandler(handler)
        simulate_out_of_memory_above(None)  # a test hook (FT_TEST_HOOK oom-above) never outlives its run
        plot_file = _finish(run, reg, status, result)
    if error is not None:
        raise error
    assert result is not None
    return _result(run, status, result, plot_file)


def _follow(
    ws: Workspace,
    dp: Any,
    overrides: Sequence[str],
    config_path: Path | None,
    resume: str | None,
    force: bool,
    control: TrainControl | None,
) -> TrainRunResult:
    """A rank other than 0: the same run, trained in step with rank 0, writing nothing."""
    shared = dp.share_text(None)
    run = _open(ws, overrides, config_path, None, None, None, resume, force, lambda _n: None, follow=shared)
    control = control or TrainControl()
    options = parallel.follower_options(run.s.options, dp)
    try:
        with Signals(control, lambda _s: None, lambda _s: None):
            result = train(
                run.s.model,
                run.optimizer,
                run.s.train_data,
                run.s.val_data,
                options,
                control=control,
                state=run.state,
            )
    except BaseException as e:
        if parallel.peer_lost(e):
            raise parallel.lost(dp, run.run_id, run.state.step, None) from None
        raise
    return _result(run, _status_of(result.stopped), result, None)


def _result(run: _Run, status: str, result: TrainResult, plot_file: Path | None) -> TrainRunResult:
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


def _reference_cache(run: _Run, logw: LogWriter) -> tuple[np.ndarray, np.ndarray | None]:
    """The cached reference of a preference run (:mod:`ft.services.preference`): computed once with the
    starting weights, stored in the run folder, reused by --resume when its key matches."""
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
        logw.line(f"reference log-probabilities computed in {time.perf_counter() - t0:.1f}s")
        assert out[0] is not None
        return out[0], out[1]

    (train_ref, val_ref), loaded = pref_svc.load_or_compute_reference(run.run_dir, key, compute)
    if loaded:
        logw.line("reference log-probabilities loaded from reference.npz (same dataset, model and start)")
    return train_ref, val_ref


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _status_of(stopped: str) -> str:
    """The registry status of a run that ended with ``stopped`` (TrainResult.stopped)."""
    return {
        "completed": "completed",
        STOP_EARLY: "early-stopped",
        STOP_INTERRUPTED: "interrupted",
        STOP_DIVERGED: "failed",
        "pruned": "pruned",  # ft tune's pruner stopped the trial (services/tune.STOP_PRUNED)
    }.get(stopped, "stopped")
