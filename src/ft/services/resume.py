"""`ft train --resume`: which run and checkpoint, whether the settings may change, what is set aside.

A resume continues from the newest intact checkpoint with the run's own settings; a change that alters
the math is refused unless forced. Damaged checkpoints are set aside and newer ones kept aside
(``superseded-*``) only once the resume is sure to go ahead.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ft.config.loader import ResolvedConfig, flatten, load_config
from ft.engine.trainer import TrainerState
from ft.errors import ErrorCode, FtError
from ft.services import models as models_svc
from ft.services.run_record import TABLE, ResumeEntry, RunRecord, RunSnapshot
from ft.workspace import Workspace
from ft.workspace.atomic import atomic_write_text, clean_leftovers
from ft.workspace.run_folder import (
    ADAPTER_CONFIG,
    ADAPTERS,
    CHECKPOINTS,
    CONFIG,
    MANIFEST,
    METRICS,
    SUPERSEDED_PREFIX,
    find_good_checkpoint,
    folders_after,
    parse_step,
    set_aside,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- resume
# Settings that never change the weights of any step: a resume may change them freely.
_FREE_KEYS = {
    "training.eval_steps",
    "training.save_steps",
    "training.keep_last",
    "training.eval_batches",
    "training.eval_samples",
    "training.max_skipped_steps",
    "early_stopping.patience",
    "early_stopping.min_delta",
}
_FREE_SECTIONS = {"logging", "tune", "distributed"}
_FINISHED = {"completed": "completed", "early-stopped": "stopped early (early stopping)"}


def config_differences(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that alter the math, harmless ones) between two config dumps, as 'key: old -> new' lines."""
    a, b = flatten(before), flatten(after)
    math_: list[str] = []
    free: list[str] = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            harmless = key in _FREE_KEYS or key.split(".", 1)[0] in _FREE_SECTIONS
            (free if harmless else math_).append(line)
    return math_, free


@dataclass
class Resume:
    run_id: str
    run_dir: Path
    row: dict[str, Any]
    checkpoint: Path | None
    resolved: ResolvedConfig
    dataset: str
    dataset_version: int
    notes: list[str]
    forced: list[str]


def _resume_target(ws: Workspace, spec: str) -> tuple[str, Path | None]:
    """(run id, requested checkpoint folder or None) from '' (latest run), a run id/name, or a path."""
    from ft.services.checkpoints import resolve_run

    if not spec:
        return resolve_run(ws, None), None
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p.resolve()
        if (p / MANIFEST).is_file() or (p / ADAPTERS).is_file() or parse_step(p.name) is not None:
            if p.parent.name != CHECKPOINTS or p.parent.parent != ws.run_dir(p.parent.parent.name).resolve():
                raise FtError(
                    ErrorCode.USAGE,
                    f"{p} is not a checkpoint of a run of this workspace ({ws.root})",
                    "pass a run id, a run name, or runs/<id>/checkpoints/step-N",
                )
            return p.parent.parent.name, p
        if (p / CHECKPOINTS).is_dir() or (p / CONFIG).is_file():
            return p.name, None
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"{p} is neither a run folder nor a checkpoint folder",
            "pass a run id, a run name, or runs/<id>/checkpoints/step-N",
        )
    if os.sep in spec:
        raise FtError(
            ErrorCode.NOT_FOUND, f"{spec} does not exist", "pass a run id, a run name, or a checkpoint folder"
        )
    return resolve_run(ws, spec), None


def plan_resume(
    ws: Workspace,
    spec: str,
    overrides: Sequence[str],
    config_path: Path | None,
    force: bool,
    claimed: bool = False,
) -> Resume:
    """What resuming ``spec`` means; ``claimed``: this process is a data-parallel follower of the rank 0 that
    is resuming the run (the run is then "running" under rank 0's process, which is no reason to refuse)."""
    run_id, requested = _resume_target(ws, spec)
    run_dir = ws.run_dir(run_id)
    row = ws.registry().get(TABLE, id=run_id) or {"id": run_id, "status": "unknown", "meta": {}}
    record = RunRecord.of(row)
    status = row.get("status") or "unknown"
    if status in _FINISHED and requested is None:
        raise FtError(
            ErrorCode.USAGE,
            f"run {run_id} is already {_FINISHED[status]} ({record.step} of {record.total_steps} "
            "steps): nothing to resume",
            f"evaluate it (ft evaluate --run {run_id}) or start a new run with ft train",
        )
    if status == "running" and not claimed and record.pid != os.getpid() and record.process_alive():
        raise FtError(
            ErrorCode.USAGE,
            f"run {run_id} is still training (process {record.pid})",
            "wait for it, or stop it (Ctrl-C / kill) and resume then",
        )
    ckpts = run_dir / CHECKPOINTS
    notes: list[str] = []
    cleaned = clean_leftovers(ckpts)
    if cleaned:
        notes.append(
            f"removed what an interrupted save left behind: {', '.join(sorted(p.name for p in cleaned))}"
        )
    # Damaged folders are set aside only once the resume is sure to go ahead (below).
    good, rejected = find_good_checkpoint(
        ckpts, newest=requested.name if requested else None, quarantine=False
    )
    snapshot_file = (good if good is not None else run_dir) / CONFIG
    snapshot = RunSnapshot.read(snapshot_file)
    if snapshot.dataset is None:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{snapshot_file}: does not name the run's dataset",
            "this run cannot be resumed; start a new one with ft train",
        )
    saved_cfg = snapshot.config.model_dump(mode="json")
    # The run's own settings, then FT_* variables and --set (or a whole --config file) on top.
    resolved = load_config(
        config_path, list(overrides), base=copy.deepcopy(saved_cfg)
    )  # the loader edits its base
    math_diff, free_diff = config_differences(saved_cfg, resolved.config.model_dump(mode="json"))
    if good is not None:
        try:
            recorded = json.loads((good / ADAPTER_CONFIG).read_text()).get("base_model_sha256") or {}
            now = models_svc.get_model(ws, resolved.config.model.name).sha256
        except (OSError, ValueError, FtError):
            recorded, now = {}, {}
        changed = sorted(k for k in recorded if now.get(k) not in (None, recorded[k]))
        if changed:
            math_diff.append(f"base model files changed since the checkpoint: {', '.join(changed)}")
    if math_diff and not force:
        damaged = f"\n  (damaged and skipped: {', '.join(r.name for r in rejected)})" if rejected else ""
        raise FtError(
            ErrorCode.RESUME_MISMATCH,
            f"resuming run {run_id} with different settings would change its math:\n  "
            + "\n  ".join(math_diff)
            + damaged,
            "resume with the run's own settings (drop those --set values), or pass --force to continue "
            "with them (recorded in the run)",
        )
    for r in rejected:
        r.moved_to = set_aside(ckpts / r.name).name
        notes.append(f"checkpoint {r.describe()}")
    if rejected and good is not None:
        notes.append(f"falling back to the previous good checkpoint, {good.name}")
    if good is None:
        notes.append("no intact checkpoint: the run starts again from step 0")
    # Resuming from an older checkpoint than the newest: the newer ones are kept aside, never overwritten.
    start = (parse_step(good.name) or 0) if good is not None else 0
    newer = folders_after(ckpts, start)
    if newer:
        stamp, k = datetime.now().strftime("%Y%m%d-%H%M%S"), 1
        aside = ckpts / f"{SUPERSEDED_PREFIX}{stamp}"
        while aside.exists():
            k += 1
            aside = ckpts / f"{SUPERSEDED_PREFIX}{stamp}-{k}"
        aside.mkdir()
        for p in newer:
            os.replace(p, aside / p.name)
        notes.append(
            f"checkpoints after {good.name if good else 'step 0'} moved to {aside.name}/: "
            + ", ".join(p.name for p in newer)
        )
    if free_diff:
        notes.append("changed settings (no effect on the math): " + "; ".join(free_diff))
    if math_diff:
        notes.append("forced despite these differences: " + "; ".join(math_diff))
    ds = snapshot.dataset
    return Resume(run_id, run_dir, row, good, resolved, ds.name, ds.version, notes, math_diff)


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics of the steps after ``step`` (they are trained again, with the same results)."""
    from ft.engine.callbacks import read_metrics

    rows = read_metrics(path)
    keep = [r for r in rows if r.get("type") not in ("train", "eval") or int(r.get("step", 0)) <= step]
    if len(keep) != len(rows) or (path.is_file() and not path.read_text().endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in keep))


def continue_run(
    res: Resume, model: Any, optimizer: Any, total_steps: int, record: RunRecord
) -> TrainerState:
    """Load the resumed checkpoint into ``model`` and ``optimizer``; the steps (and evaluations) after it
    are done again, so their metrics and registry entries go. Returns the trainer state to continue from."""
    from ft.engine.checkpoint import load_checkpoint

    state = TrainerState()
    if res.checkpoint is not None:
        state = TrainerState.from_json(load_checkpoint(res.checkpoint, model, optimizer))
    if state.step >= total_steps:
        raise FtError(
            ErrorCode.USAGE,
            f"run {res.run_id} already did {state.step} of {total_steps} steps: nothing to resume",
            f"start a new run with ft train, or evaluate it: ft evaluate --run {res.run_id}",
        )
    kept = state.step if res.checkpoint is not None else -1  # without a checkpoint: all of them
    trim_metrics(res.run_dir / METRICS, kept)
    record.step = state.step
    record.evals = [e for e in record.evals if e[0] <= kept]
    if record.evals and record.evals[0][0] == 0:
        record.first_val_loss = record.evals[0][1]
    entry = ResumeEntry(
        at=datetime.now().isoformat(timespec="seconds"),
        from_=res.checkpoint.name if res.checkpoint is not None else None,
        step=state.step,
        forced_differences=res.forced,
        notes=res.notes,
    )
    record.resumes = [*record.resumes, entry]
    return state
