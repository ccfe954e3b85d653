"""Self-describing checkpoint folders, written atomically.

``runs/<id>/checkpoints/step-000100/`` holds:

=========================  ==========================================================================
``adapters.safetensors``   the trained weights (LoRA/DoRA matrices, or every trained weight for full)
``adapter_config.json``    enough to rebuild the model: base model, method, rank, alpha, targets, layers
``optimizer.safetensors``  the optimizer state (moments, step count, learning rate)
``trainer_state.json``     step, epoch, position in the epoch's plan, best metric, counters
``config.json``            the resolved train.yml this run used
``manifest.json``          sha256 and size of every file above
=========================  ==========================================================================

A folder is written under a temporary name, fsynced and renamed (``ft.workspace.atomic.atomic_dir``);
the ``latest`` and ``best`` pointers (small text files naming a step folder) move only after. No
non-finite tensor is ever written. Old folders beyond ``keep_last`` are removed, never the one a
pointer names.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ft.engine.callbacks import StepEvent
from ft.engine.lora import trainable_weights
from ft.errors import ErrorCode, FtError
from ft.workspace.atomic import atomic_dir, atomic_write_text, clean_leftovers

CHECKPOINTS = "checkpoints"
ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.json"
MANIFEST = "manifest.json"
LATEST, BEST = "latest", "best"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _all_finite(arrays: dict[str, mx.array]) -> list[str]:
    bad = []
    for k, v in arrays.items():
        if mx.issubdtype(v.dtype, mx.floating) and not bool(mx.all(mx.isfinite(v)).item()):
            bad.append(k)
    return bad


def save_checkpoint(folder: Path, step: int, model: nn.Module, optimizer: optim.Optimizer, trainer_state: dict[str, Any],
                    adapter_config: dict[str, Any], config: dict[str, Any]) -> Path:  # fmt: skip
    """Write ``folder/step-NNNNNN`` atomically and move ``latest`` to it; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_leftovers(folder)
    weights = trainable_weights(model)
    opt_state = {k: v for k, v in tree_flatten(optimizer.state)}
    bad = _all_finite(weights) + _all_finite(opt_state)
    if bad:
        raise FtError(ErrorCode.TRAINING_DIVERGED, f"refusing to save step {step}: non-finite values in {bad[:3]}",
                      "lower training.learning_rate or keep training.max_grad_norm on")  # fmt: skip
    final = folder / step_name(step)
    with atomic_dir(final, overwrite=True) as tmp:
        mx.save_safetensors(str(tmp / ADAPTERS), weights, metadata={"format": "mlx"})
        mx.save_safetensors(str(tmp / OPTIMIZER), opt_state, metadata={"format": "mlx"})
        for name, obj in ((ADAPTER_CONFIG, adapter_config), (TRAINER_STATE, trainer_state), (CONFIG, config)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"step": step, "files": {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    set_pointer(folder, LATEST, final.name)
    return final


def set_pointer(folder: Path, pointer: str, target: str) -> None:
    atomic_write_text(Path(folder) / pointer, target + "\n")


def read_pointer(folder: Path, pointer: str) -> str | None:
    p = Path(folder) / pointer
    if not p.is_file():
        return None
    name = p.read_text().strip()
    return name if name and (Path(folder) / name).is_dir() else None


def step_folders(folder: Path) -> list[Path]:
    out = []
    for p in Path(folder).glob("step-*"):
        if p.is_dir() and p.name[5:].isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[5:]))


def prune(folder: Path, keep_last: int) -> list[str]:
    """Remove step folders beyond the newest ``keep_last``, sparing any a pointer names."""
    protected = {read_pointer(folder, LATEST), read_pointer(folder, BEST)}
    steps = step_folders(folder)
    removed = []
    for p in steps[: max(0, len(steps) - keep_last)]:
        if p.name not in protected:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


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
    saved: list[str] = field(default_factory=list)
    _best_pending: bool = False
    _last_saved_step: int | None = None

    def _save(self) -> Path:
        path = save_checkpoint(self.folder, self.state.step, self.model, self.optimizer, self.state.to_json(),
                               self.adapter_config, self.config)  # fmt: skip
        self._last_saved_step = self.state.step
        self.saved.append(path.name)
        if self.on_saved:
            self.on_saved(path)
        return path

    def on_eval(self, event: Any) -> None:
        if event.is_best and event.step > 0:  # step 0 is the untouched base model: nothing to save
            self._best_pending = True

    def on_step_end(self, event: StepEvent) -> None:
        due = event.step % self.save_steps == 0 or event.step == event.total_steps
        if due or self._best_pending:
            path = self._save()
            if self._best_pending:
                set_pointer(self.folder, BEST, path.name)
                self._best_pending = False
            prune(self.folder, self.keep_last)

    def on_train_end(self, result: Any) -> None:
        if self.state.step > 0 and self._last_saved_step != self.state.step:
            path = self._save()
            if self._best_pending:
                set_pointer(self.folder, BEST, path.name)
            prune(self.folder, self.keep_last)
        elif self._best_pending and self._last_saved_step is not None:
            set_pointer(self.folder, BEST, step_name(self._last_saved_step))
        self._best_pending = False
