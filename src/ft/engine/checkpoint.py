"""Writing checkpoint folders atomically, and putting one back into a model and its optimizer.

The folder layout, the pointers and the checks on reading back are :mod:`ft.workspace.run_folder`'s.
A folder is written under a temporary name, fsynced and renamed (``ft.workspace.atomic.atomic_dir``);
the ``latest`` and ``best`` pointers move only after. No non-finite tensor is ever written. Old folders
beyond ``keep_last`` are removed, never the one a pointer names.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ft.engine.callbacks import StepEvent
from ft.engine.lora import trainable_weights
from ft.errors import ErrorCode, FtError
from ft.workspace.atomic import atomic_dir, clean_leftovers
from ft.workspace.run_folder import (
    ADAPTER_CONFIG,
    ADAPTERS,
    BEST,
    CONFIG,
    KEPT_REFERENCE,
    LATEST,
    OPTIMIZER,
    TRAINER_STATE,
    pointer_name,
    set_pointer,
    step_folders,
    step_name,
    write_manifest,
)


def _all_finite(arrays: dict[str, mx.array]) -> list[str]:
    bad = []
    for k, v in arrays.items():
        if mx.issubdtype(v.dtype, mx.floating) and not bool(mx.all(mx.isfinite(v)).item()):
            bad.append(k)
    return bad


def save_checkpoint(
    folder: Path,
    step: int,
    model: nn.Module,
    optimizer: optim.Optimizer,
    trainer_state: dict[str, Any],
    adapter_config: dict[str, Any],
    config: dict[str, Any],
    before_rename: Callable[[Path], None] | None = None,
    kept: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``folder/step-NNNNNN`` atomically and move ``latest`` to it; returns the folder.

    ``before_rename(tmp)`` runs when every file is written but the folder still has its temporary
    name (tests pause there to kill the process in the middle of a save). ``kept``: values a run keeps
    rather than recomputes (a preference run's reference log-probabilities, NaN where not computed yet),
    so that a resumed run uses the very same numbers.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_leftovers(folder)
    weights = trainable_weights(model)
    opt_state = {k: v for k, v in tree_flatten(optimizer.state)}
    bad = _all_finite(weights) + _all_finite(opt_state)
    if bad:
        raise FtError(
            ErrorCode.TRAINING_DIVERGED,
            f"refusing to save step {step}: non-finite values in {bad[:3]}",
            "lower training.learning_rate or keep training.max_grad_norm on",
        )
    final = folder / step_name(step)
    with atomic_dir(final, overwrite=True) as tmp:
        mx.save_safetensors(str(tmp / ADAPTERS), weights, metadata={"format": "mlx"})
        mx.save_safetensors(str(tmp / OPTIMIZER), opt_state, metadata={"format": "mlx"})
        if kept:
            mx.save_safetensors(str(tmp / KEPT_REFERENCE), {k: mx.array(v) for k, v in kept.items()})
        for name, obj in ((ADAPTER_CONFIG, adapter_config), (TRAINER_STATE, trainer_state), (CONFIG, config)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        write_manifest(tmp, step)
        if before_rename is not None:
            before_rename(tmp)
    set_pointer(folder, LATEST, final.name)
    return final


def prune(folder: Path, keep_last: int) -> list[str]:
    """Remove step folders beyond the newest ``keep_last``, sparing any a pointer names."""
    protected = {pointer_name(folder, LATEST), pointer_name(folder, BEST)}
    steps = step_folders(folder)
    removed = []
    for p in steps[: max(0, len(steps) - keep_last)]:
        if p.name not in protected:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _set_flat(tree: Any, key: str, value: mx.array) -> bool:
    """Put ``value`` at the dotted ``key`` of a nested dict/list tree; False when the path does not exist."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict) and last in node:
        node[last] = value
    else:
        return False
    return True


def load_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer) -> dict[str, Any]:
    """Put a verified checkpoint's weights into ``model`` and its state into ``optimizer``; returns trainer_state
    (with the kept values under ``"kept"`` when the checkpoint has them).

    Every tensor must match the model's trainable weights and the optimizer's state by name and shape.
    """
    path = Path(path)
    weights = mx.load(str(path / ADAPTERS))
    live = trainable_weights(model)
    problems = [f"{k}: not a trainable weight of the model" for k in weights if k not in live]
    problems += [f"{k}: missing from {ADAPTERS}" for k in live if k not in weights]
    problems += [
        f"{k}: shape {tuple(v.shape)} vs {tuple(live[k].shape)}"
        for k, v in weights.items()
        if k in live and tuple(v.shape) != tuple(live[k].shape)
    ]
    if problems:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path} does not fit the model: " + "; ".join(problems[:5]),
            "the run's adapter settings changed; resume with the run's own settings",
        )
    model.load_weights(list(weights.items()), strict=False)
    # A fresh state of the right structure, then every saved leaf into it (the optimizer keeps this state
    # object: ``init`` only fills what is missing).
    optimizer.init(model.trainable_parameters())
    state = tree_map(lambda v: v, optimizer.state)
    saved = mx.load(str(path / OPTIMIZER))
    expected = {k for k, _ in tree_flatten(state)}
    missing = sorted(expected - set(saved))
    unknown = [k for k, v in saved.items() if not _set_flat(state, k, v)]
    if missing or unknown:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path / OPTIMIZER} does not fit the optimizer: missing {missing[:3]}, unknown {unknown[:3]}",
            "the optimizer setting changed; resume with the run's own settings",
        )
    optimizer.state = state
    mx.eval(model.parameters(), optimizer.state)
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    if (path / KEPT_REFERENCE).exists():
        trainer_state["kept"] = {k: np.array(v) for k, v in mx.load(str(path / KEPT_REFERENCE)).items()}
    return trainer_state


@dataclass
class CheckpointSaver:
    """Callback: a checkpoint every ``save_steps``, at every new best evaluation, and at the end.

    ``state`` is the live TrainerState object the trainer mutates (passed to ``train(state=...)``).
    """

    folder: Path
    model: nn.Module
    optimizer: optim.Optimizer
    state: Any
    save_steps: int
    keep_last: int
    adapter_config: dict[str, Any]
    config: dict[str, Any]
    on_saved: Callable[[Path], None] | None = None
    before_rename: Callable[[Path], None] | None = None
    saved: list[str] = field(default_factory=list)
    _best_pending: bool = False
    _save_pending: bool = False
    _last_saved_step: int | None = None

    def _save(self) -> Path:
        path = save_checkpoint(
            self.folder,
            self.state.step,
            self.model,
            self.optimizer,
            self.state.to_json(),
            self.adapter_config,
            self.config,
            self.before_rename,
            kept=getattr(self.state, "kept", None),
        )
        self._last_saved_step = self.state.step
        self.saved.append(path.name)
        if self.on_saved:
            self.on_saved(path)
        return path

    def mark_saved(self, step: int) -> None:
        """Step ``step`` is on disk already (a resumed run's checkpoint): no save is due for it."""
        self._last_saved_step = step

    def on_eval(self, event: Any) -> None:
        if event.is_best and event.step > 0:  # step 0 is the untouched base model: nothing to save
            self._best_pending = True

    def on_step_end(self, event: StepEvent) -> None:
        due = event.step % self.save_steps == 0 or event.step == event.total_steps
        if event.skipped:
            # A skipped (non-finite) step is not a point to resume from: save at the next good one.
            self._save_pending = self._save_pending or due
            return
        if due or self._best_pending or self._save_pending:
            path = self._save()
            if self._best_pending:
                set_pointer(self.folder, BEST, path.name)
                self._best_pending = False
            self._save_pending = False
            prune(self.folder, self.keep_last)

    def on_train_end(self, result: Any) -> None:
        if getattr(result, "stopped", None) == "diverged":
            return  # the last good checkpoint stays the latest: nothing after it is worth keeping
        if self.state.step > 0 and self._last_saved_step != self.state.step:
            path = self._save()
            if self._best_pending:
                set_pointer(self.folder, BEST, path.name)
            prune(self.folder, self.keep_last)
        elif self._best_pending and self._last_saved_step is not None:
            set_pointer(self.folder, BEST, step_name(self._last_saved_step))
        self._best_pending = False
