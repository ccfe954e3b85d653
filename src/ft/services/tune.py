"""`ft tune`: a Bayesian hyperparameter search whose trials are real `ft train` runs.

A study is optuna's (TPE sampler by default) with its state in the workspace's ``tune.db`` (optuna's
sqlite storage, next to the registry ``ft.db``). Each trial:

1. asks the sampler for values of the searched keys (``tune.space`` in train.yml, or the default space);
2. trains with exactly those values as ``--set key=value`` overrides through
   :func:`ft.services.training.run_training`, so a trial's run is an ordinary run (same files, same
   registry row, same losses as ``ft train --set ...`` with the same seed), named ``<study>-t<N>``
   and tagged with the study;
3. reports each periodic validation loss to the pruner, which may stop the run at that evaluation
   (the run is recorded as ``pruned``); the trial's value is the run's best validation loss, or an
   ``ft evaluate`` metric of its best checkpoint.

The study's settings (space, objective, direction, sampler, pruner, overrides, dataset) are stored
in the study when it is created, so ``--resume`` continues the same search. A study killed at any
point loses at most the trial in flight: on resume that trial is marked failed (``interrupted``) and
its values are tried again. One study runs at a time per workspace (an OS file lock, released even
by ``kill -9``) unless ``allow_concurrent``.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from ft.config.loader import load_config
from ft.config.train import TuneParam, TuneSection, parse_duration
from ft.engine.callbacks import TrainControl
from ft.errors import ErrorCode, FtError
from ft.services import training as training_svc
from ft.services.tune_report import (
    TrialRow,
    TrialStatus,
    TuneProgress,
    TuneResult,
    as_set,
    best_trial,
    plots,
    write_best,
)
from ft.workspace import Workspace, validate_name

log = logging.getLogger("ft.tune")

STUDY_DB = "tune.db"
TUNE_DIR = "tune"
LOCK_FILE = ".lock"
STOP_PRUNED = "pruned"
_ATTR_SETTINGS = "ft_settings"
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl")


def default_space(
    ws: Workspace, overrides: Sequence[str] = (), config_path: Path | None = None
) -> dict[str, TuneParam]:
    """ft's default search space, centred on the configured values."""
    cfg = load_config(config_path if config_path is not None else ws, list(overrides)).config
    t = cfg.training
    lr_low, lr_high = max(t.learning_rate / 10, 1e-7), min(t.learning_rate * 10, 1.0)
    space = {"training.learning_rate": TuneParam(type="loguniform", low=lr_low, high=lr_high)}
    if t.method != "full":
        space["lora.rank"] = TuneParam(type="choice", choices=[4, 8, 16, 32, 64])
        space["lora.alpha"] = TuneParam(type="choice", choices=[8.0, 16.0, 32.0, 64.0])
        space["lora.dropout"] = TuneParam(type="uniform", low=0.0, high=0.2)
    warm_high = max(1, (t.max_steps - 1) // 2) if t.max_steps is not None else max(1, 2 * t.warmup_steps)
    space["training.warmup_steps"] = TuneParam(type="int", low=0, high=warm_high)
    if t.max_steps is None:
        space["training.epochs"] = TuneParam(type="choice", choices=[1, 2, 3])
    return space


def direction_of(objective: str, direction: str) -> Literal["minimize", "maximize"]:
    if direction in ("minimize", "maximize"):
        return direction  # type: ignore[return-value]
    return "minimize" if any(w in objective.lower() for w in _LOWER_IS_BETTER) else "maximize"


def study_dir(ws: Workspace, study: str) -> Path:
    return ws.root / TUNE_DIR / validate_name(study, "study name")


def _storage(ws: Workspace) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.storages.RDBStorage(
        f"sqlite:///{ws.root / STUDY_DB}", engine_kwargs={"connect_args": {"timeout": 30}}
    )


@contextmanager
def _study_lock(ws: Workspace, allow_concurrent: bool) -> Iterator[None]:
    if allow_concurrent:
        yield
        return
    folder = ws.root / TUNE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            who = fh.read().strip() or "another process"
            raise FtError(
                ErrorCode.USAGE,
                f"a study is already running in this workspace ({who})",
                "wait for it to finish, or pass --allow-concurrent to run two studies at once",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _suggest(trial: Any, key: str, p: TuneParam) -> Any:
    if p.type == "choice":
        return trial.suggest_categorical(key, p.choices)
    if p.type == "int":
        return trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1))  # type: ignore[arg-type]
    return trial.suggest_float(key, p.low, p.high, log=p.type == "loguniform")


class _Pruning:
    """Reports each validation loss to the trial; stops the run where the pruner says so."""

    def __init__(self, trial: Any, control: TrainControl, active: bool):
        self.trial, self.control, self.active = trial, control, active
        self.pruned_at: int | None = None

    def on_eval(self, e: Any) -> None:
        if not self.active or e.val_loss is None or not math.isfinite(e.val_loss):
            return
        self.trial.report(float(e.val_loss), int(e.step))
        if self.trial.should_prune():
            self.pruned_at = int(e.step)
            self.control.stop(STOP_PRUNED)


def _objective_value(ws: Workspace, objective: str, result: training_svc.TrainRunResult) -> float | None:
    if objective == "val_loss":
        return result.best_val_loss
    from ft.config.loader import flatten
    from ft.services import evaluation as eval_svc

    report = eval_svc.evaluate(ws, run=result.run_id, checkpoint="best", n_samples=0, compare_base=False)
    values = flatten(report.tuned.model_dump(mode="json"))
    hits = [v for k, v in values.items() if k == objective or k.endswith("." + objective)]
    if not hits or not isinstance(hits[0], int | float):
        known = ", ".join(sorted(k for k, v in values.items() if isinstance(v, int | float)))
        raise FtError(
            ErrorCode.CONFIG_INVALID,
            f"tune.objective {objective!r} is not a metric of ft evaluate",
            f"use val_loss or one of: {known}",
        )
    return float(hits[0])


def _row(trial: Any) -> TrialRow:
    import optuna

    attrs = trial.user_attrs
    state = trial.state
    status: TrialStatus
    if state == optuna.trial.TrialState.COMPLETE:
        status = "completed"
    elif state == optuna.trial.TrialState.PRUNED:
        status = "pruned"
    elif state == optuna.trial.TrialState.RUNNING:
        status = "running"
    else:
        status = "interrupted" if attrs.get("interrupted") else "failed"
    return TrialRow(
        number=trial.number,
        status=status,
        params=dict(trial.params),
        value=trial.value if trial.value is not None else attrs.get("value"),
        run_id=attrs.get("run_id"),
        seconds=attrs.get("seconds"),
        pruned_at_step=attrs.get("pruned_at_step"),
        error=attrs.get("error"),
    )


def _counted(row: TrialRow) -> bool:
    return row.status in ("completed", "pruned", "failed")


def _open_study(
    ws: Workspace,
    name: str,
    resume: bool,
    settings: dict[str, Any],
    notes: list[str],
) -> Any:
    import optuna

    storage = _storage(ws)
    existing = {s.study_name for s in optuna.study.get_all_study_summaries(storage)}
    if resume:
        if name not in existing:
            raise FtError(
                ErrorCode.NOT_FOUND,
                f"no study named {name!r} in this workspace",
                f"studies here: {', '.join(sorted(existing)) or 'none'}; start one with ft tune --name {name}",
            )
        study = optuna.load_study(study_name=name, storage=storage)
    else:
        if name in existing:
            raise FtError(
                ErrorCode.ALREADY_EXISTS,
                f"study {name!r} already exists",
                f"continue it with ft tune --resume {name}, or pick another --name",
            )
        study = optuna.create_study(
            study_name=name, storage=storage, direction=settings["direction"], load_if_exists=False
        )
        study.set_user_attr(_ATTR_SETTINGS, settings)
    # A trial left running by a process that is gone (kill -9, power loss) is failed and tried again.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(t.params), skip_if_exists=False)
        notes.append(
            f"trial {t.number} was interrupted (run {t.user_attrs.get('run_id', '-')}): marked failed, its values are tried again"
        )
    return study


def _sampler_and_pruner(settings: dict[str, Any]) -> tuple[Any, Any]:
    import optuna

    seed, startup = settings["seed"], settings["startup_trials"]
    sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, startup))
        if settings["sampler"] == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    pruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=1),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
        "none": optuna.pruners.NopPruner,
    }[settings["pruner"]]()
    return sampler, pruner


def tune(
    ws: Workspace,
    *,
    name: str | None = None,
    resume: str | None = None,
    trials: int | None = None,
    timeout: str | None = None,
    objective: str | None = None,
    overrides: Sequence[str] = (),
    config_path: Path | None = None,
    dataset: str | None = None,
    allow_concurrent: bool = False,
    progress: Callable[[TuneProgress], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> TuneResult:
    """Run (or continue) a study until its trial budget or time budget is spent; see the module docstring."""

    t0 = time.perf_counter()
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if on_note:
            on_note(text)

    if name and resume:
        raise FtError(ErrorCode.USAGE, "--name and --resume both name a study", "pass only one of them")
    study_name = validate_name(resume or name or time.strftime("study-%Y%m%d-%H%M%S"), "study name")
    with _study_lock(ws, allow_concurrent):
        if resume:
            settings: dict[str, Any] = {}
        else:
            settings = _new_settings(ws, overrides, config_path, dataset, objective, trials, timeout)
        study = _open_study(ws, study_name, bool(resume), settings, notes)
        for n in notes:
            if on_note:
                on_note(n)
        settings = dict(study.user_attrs[_ATTR_SETTINGS])
        if trials is not None:
            settings["trials"] = trials
        if timeout is not None:
            settings["timeout"] = timeout
        budget = int(settings["trials"])
        deadline = t0 + parse_duration(settings["timeout"]) if settings.get("timeout") else math.inf
        space = {k: TuneParam.model_validate(v) for k, v in settings["space"].items()}
        study.sampler, study.pruner = _sampler_and_pruner(settings)
        stopped = "budget"
        while True:
            rows = [_row(t) for t in study.get_trials(deepcopy=False)]
            done = sum(_counted(r) for r in rows)
            if done >= budget:
                break
            if time.perf_counter() >= deadline:
                stopped = "timeout"
                note(f"the time budget ({settings['timeout']}) is spent: no new trial started")
                break
            status = _run_trial(ws, study, study_name, space, settings, done, budget, progress)
            if status == "interrupted":
                stopped = "interrupted"
                break
        out = study_dir(ws, study_name)
        out.mkdir(parents=True, exist_ok=True)
        rows = [_row(t) for t in study.get_trials(deepcopy=False)]
        best = best_trial(study, rows)
        best_config = write_best(ws, out, settings, best) if best else None
        plot_files = plots(study, out, note)
    return TuneResult(
        study=study_name,
        objective=settings["objective"],
        direction=settings["direction"],
        space={k: v.model_dump(exclude_none=True) for k, v in space.items()},
        trials=rows,
        best=best,
        best_config=str(best_config) if best_config else None,
        plots=[str(p) for p in plot_files],
        total_seconds=round(time.perf_counter() - t0, 1),
        stopped=stopped,
        notes=notes,
    )


def _new_settings(
    ws: Workspace,
    overrides: Sequence[str],
    config_path: Path | None,
    dataset: str | None,
    objective: str | None,
    trials: int | None,
    timeout: str | None,
) -> dict[str, Any]:
    cfg = load_config(config_path if config_path is not None else ws, list(overrides)).config
    section: TuneSection = cfg.tune
    space = section.space or default_space(ws, overrides, config_path)
    obj = objective or section.objective
    return {
        "space": {k: v.model_dump(exclude_none=True) for k, v in space.items()},
        "objective": obj,
        "direction": direction_of(obj, section.direction),
        "sampler": section.sampler,
        "pruner": section.pruner if obj == "val_loss" else "none",
        "startup_trials": section.startup_trials,
        "trials": trials if trials is not None else section.trials,
        "timeout": timeout if timeout is not None else section.timeout,
        "seed": cfg.training.seed,
        "overrides": list(overrides),
        "config_path": str(config_path) if config_path else None,
        "dataset": dataset,
    }


def _run_trial(
    ws: Workspace,
    study: Any,
    study_name: str,
    space: dict[str, TuneParam],
    settings: dict[str, Any],
    done: int,
    budget: int,
    progress: Callable[[TuneProgress], None] | None,
) -> TrialStatus:
    import optuna

    trial = study.ask()
    params = {k: _suggest(trial, k, p) for k, p in space.items()}
    run_name = f"{study_name}-t{trial.number}"
    row = TrialRow(number=trial.number, status="running", params=params, run_id=None)
    if progress:
        progress(TuneProgress(kind="start", trial=row, done=done, budget=budget))
    control = TrainControl()
    pruning = _Pruning(trial, control, active=settings["pruner"] != "none")
    sets = [*settings["overrides"], *(as_set(k, v) for k, v in params.items())]
    t0 = time.perf_counter()
    state, value, error = optuna.trial.TrialState.FAIL, None, None
    try:
        result = training_svc.run_training(
            ws,
            sets,
            Path(settings["config_path"]) if settings.get("config_path") else None,
            settings.get("dataset"),
            name=run_name,
            callbacks=[pruning],
            control=control,
            study=study_name,
        )
        trial.set_user_attr("run_id", result.run_id)
        if result.status == "interrupted":
            trial.set_user_attr("interrupted", True)
        elif pruning.pruned_at is not None:
            state = optuna.trial.TrialState.PRUNED
            trial.set_user_attr("pruned_at_step", pruning.pruned_at)
        elif result.status in ("completed", "early-stopped"):
            value = _objective_value(ws, settings["objective"], result)
            if value is not None and math.isfinite(value):
                state = optuna.trial.TrialState.COMPLETE
            else:
                error = "no finite objective value (no validation split?)"
        else:
            error = f"run ended as {result.status}"
    except FtError as e:
        error = e.message
        log.warning("trial %s failed: %s", trial.number, e.message)
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
    if error:
        trial.set_user_attr("error", error)
    if state == optuna.trial.TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)
    final = _row(study.get_trials(deepcopy=False)[trial.number])
    if progress:
        progress(TuneProgress(kind="end", trial=final, done=done + int(_counted(final)), budget=budget))
    return final.status


def list_studies(ws: Workspace) -> list[str]:
    import optuna

    if not (ws.root / STUDY_DB).is_file():
        return []
    return sorted(s.study_name for s in optuna.study.get_all_study_summaries(_storage(ws)))
