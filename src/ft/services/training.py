"""`ft train`: resolve config, dataset and model, run the engine into ``runs/<id>/``, record it.

The service wires the pieces; the engine (:mod:`ft.engine.trainer`) does the math and reports
through callbacks. Callers (the CLI) pass their own callbacks for a live display. Everything a run
produces is in its folder: ``metrics.jsonl``, ``train.log``, ``config.json``, ``loss.png`` and
``checkpoints/``; its registry row (table ``runs``) says how it went.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ft import __version__
from ft.engine.callbacks import LogWriter, MetricsWriter, TrainControl
from ft.engine.checkpoint import CheckpointSaver
from ft.engine.memory import MemoryMonitor, is_out_of_memory, simulate_out_of_memory_above
from ft.engine.trainer import (
    TrainerState,
    train,
)
from ft.errors import ErrorCode, FtError
from ft.services import parallel
from ft.services.resume import Resume, continue_run, plan_resume
from ft.services.run_record import (
    DatasetRef,
    RunRecord,
    RunSnapshot,
    new_run_id,
    now,
    status_of,
)
from ft.services.signals import Signals
from ft.services.tracking import LogHandler, RegistryTracker, trackers
from ft.services.train_outcome import (
    Run,
    TrainRunResult,
    adapter_config,
    finish,
    objective_args,
    out_of_memory,
    outcome,
    result_of,
    start_record,
)
from ft.services.train_setup import (
    TrainPlan,
    make_optimizer,
    plan_of,
    setup,
)
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_write_json
from ft.workspace.run_folder import (
    CHECKPOINTS,
    CONFIG,
    LATEST,
    METRICS,
    TRAIN_LOG,
    pointer_name,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- run
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
) -> Run:
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
        # A follower rank resumes the run its rank 0 has already claimed (and checked): that one is training.
        res = plan_resume(ws, resume, overrides, config_path, force, claimed=follow is not None)
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
    run = Run(
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


def _log_start(run: Run, logw: LogWriter) -> None:
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
    run: Run, logw: LogWriter, reg: RegistryTracker, control: TrainControl, extra: Sequence[object]
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
        run.record.finished_at = now()
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
            data, pref_kw = objective_args(run, logw)
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
        status, error = outcome(run, result, signals.signum)
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
        failure = out_of_memory(run, e) if is_out_of_memory(e) else e
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
        plot_file = finish(run, reg, status, result)
    if error is not None:
        raise error
    assert result is not None
    return result_of(run, status, result, plot_file)


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
    if not shared:  # rank 0 always shares "RUN_ID\n..."; nothing means it ended before (its error says why)
        raise FtError(
            ErrorCode.RANK_LOST,
            f"rank 0 stopped before the run started; {dp.where()} ends too",
            "see rank 0's error above",
        )
    run = _open(ws, overrides, config_path, None, None, None, resume, force, lambda _n: None, follow=shared)
    control = control or TrainControl()
    options = parallel.follower_options(run.s.options, dp)
    try:
        with Signals(control, lambda _s: None, lambda _s: None):
            data, pref_kw = objective_args(run, None)
            result = train(
                run.s.model, run.optimizer, *data, options, control=control, state=run.state, **pref_kw
            )
    except BaseException as e:
        if parallel.peer_lost(e):
            raise parallel.lost(dp, run.run_id, run.state.step, None) from None
        raise
    return result_of(run, status_of(result.stopped), result, None)


# ----------------------------------------------------------------------------------------- dry run
def dry_run(
    ws: Workspace,
    overrides: Sequence[str] = (),
    config_path: Path | None = None,
    dataset: str | None = None,
    warmup_steps: int = 3,
    prepare_progress: Callable[[Any], None] | None = None,
) -> TrainPlan:
    """The plan without training: sizes, steps, tokens, and time and peak memory from a short measured warm-up.

    The warm-up runs ``warmup_steps`` real steps (the heaviest of the first epoch, so the memory peak is
    the run's) on a throw-away copy of the state; nothing is written.
    """
    import mlx.core as mx

    from ft.engine.batching import index_examples, plan_epoch

    s = setup(ws, overrides, config_path, dataset, prepare_progress)
    plan = plan_of(s)
    if s.pref is not None:  # the warm-up measures SFT steps; a preference step is planned differently
        plan.warnings.append("--dry-run measures speed and memory for objective sft only")
        return plan
    index = index_examples(s.train_data, s.options.batch.max_seq_length)
    steps = plan_epoch(index, s.options.batch, 0)
    heavy = sorted(steps, key=lambda p: -max(mb.shape[0] * mb.shape[1] for mb in p.micro_batches))
    chosen = heavy[: max(2, warmup_steps)]
    times: list[tuple[float, int]] = []

    class Timer:
        def on_step(self, e: Any) -> None:
            times.append((e.step_seconds, e.tokens))

    mx.reset_peak_memory()
    opts = dataclasses.replace(s.options, total_steps=len(chosen), eval_at_start=False, sample_prompts=())
    train(
        s.model,
        make_optimizer(s),
        s.train_data,
        None,
        opts,
        plan=lambda _i, _o, _e: chosen,
        callbacks=[Timer()],
    )
    steady = times[1:] or times  # the first step pays for compilation
    tok_s = sum(n for _, n in steady) / max(1e-9, sum(dt for dt, _ in steady))
    plan.measured_tokens_per_second = round(tok_s, 1)
    plan.measured_step_seconds = round(float(np.mean([dt for dt, _ in steady])), 3)
    plan.measured_peak_memory_gb = round(mx.get_peak_memory() / 1e9, 3)
    n_evals = plan.total_steps // max(1, s.cfg.training.eval_steps) + 2 if s.val_data is not None else 0
    val_tokens = plan.val_examples * plan.tokens_per_epoch / max(1, plan.train_examples)
    compile_s = max(0.0, times[0][0] - plan.measured_step_seconds) * plan.distinct_shapes
    # Evaluation is a forward pass: about a third of a training step's work per token.
    plan.estimated_seconds = round(
        plan.total_tokens / tok_s + n_evals * val_tokens / (3 * tok_s) + compile_s, 1
    )
    return plan
