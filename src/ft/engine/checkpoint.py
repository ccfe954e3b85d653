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

Reading back (:func:`verify_checkpoint`, :func:`find_good_checkpoint`) trusts nothing: every file of
the manifest must exist with its size and sha256, and a safetensors file must have a sound header
whose tensors fill the file exactly. A damaged folder is reported file by file and set aside
(``corrupt-step-NNNNNN``), and resume falls back to the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

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
CORRUPT_PREFIX = "corrupt-"
REQUIRED = (ADAPTERS, ADAPTER_CONFIG, OPTIMIZER, TRAINER_STATE, CONFIG)


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


def save_checkpoint(
    folder: Path,
    step: int,
    model: nn.Module,
    optimizer: optim.Optimizer,
    trainer_state: dict[str, Any],
    adapter_config: dict[str, Any],
    config: dict[str, Any],
    before_rename: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``folder/step-NNNNNN`` atomically and move ``latest`` to it; returns the folder.

    ``before_rename(tmp)`` runs when every file is written but the folder still has its temporary
    name (tests pause there to kill the process in the middle of a save).
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
        for name, obj in ((ADAPTER_CONFIG, adapter_config), (TRAINER_STATE, trainer_state), (CONFIG, config)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {
            "step": step,
            "files": {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if before_rename is not None:
            before_rename(tmp)
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


# ----------------------------------------------------------------------------- reading back
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "C64": 8,
}


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a sound safetensors file (None when it is): header length, JSON, tensor extents."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name}: {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > size - 8 or n > 100_000_000:
                return f"{path.name}: bad safetensors header (header length {n} in a {size}-byte file)"
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path.name}: bad safetensors header ({type(e).__name__}: {e})"
    if not isinstance(header, dict):
        return f"{path.name}: bad safetensors header (not a JSON object)"
    data = size - 8 - n
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            want = count * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            return f"{path.name}: bad safetensors header entry for {name!r}"
        if not (0 <= begin <= end <= data) or end - begin != want:
            return f"{path.name}: tensor {name!r} lies outside the file (truncated?)"
        end_max = max(end_max, end)
    if end_max != data:
        return f"{path.name}: {data} data bytes but the tensors need {end_max} (truncated or padded)"
    return None


def verify_checkpoint(path: Path, *, hashes: bool = True) -> list[str]:
    """Every problem of the checkpoint folder ``path`` (empty = good): missing files, size/sha256, headers.

    ``hashes=False`` skips the sha256 of each file (sizes and headers only: quick even for full weights).
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path.name}: not a folder"]
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError:
        return [f"{MANIFEST} is missing (an incomplete save?)"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"]
    problems = [f"{name} is missing" for name in REQUIRED if name not in files]
    for name, info in sorted(files.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
            continue
        if f.stat().st_size != info.get("bytes"):
            problems.append(
                f"{name}: {f.stat().st_size} bytes, the manifest says {info.get('bytes')} (truncated?)"
            )
        elif hashes and _sha256(f) != info.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (damaged or changed)")
        if name.endswith(".safetensors") and (p := safetensors_problem(f)):
            problems.append(p)
        elif name.endswith(".json"):
            try:
                json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"{name}: not valid JSON ({e})")
    return problems


@dataclass
class Rejected:
    name: str
    problems: list[str]
    moved_to: str | None = None

    def describe(self) -> str:
        where = f" (moved to {self.moved_to})" if self.moved_to else ""
        return f"{self.name} is damaged{where}: " + "; ".join(self.problems)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``corrupt-step-NNNNNN[-k]``: kept for inspection, never read again."""
    path = Path(path)
    k, target = 1, path.with_name(CORRUPT_PREFIX + path.name)
    while target.exists():
        k += 1
        target = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{k}")
    os.replace(path, target)
    return target


def find_good_checkpoint(
    folder: Path, *, newest: str | None = None, quarantine: bool = True
) -> tuple[Path | None, list[Rejected]]:
    """The newest step folder that verifies (at or below ``newest`` when given), and those rejected on the way.

    Damaged folders are set aside (``quarantine``) so that no pointer or later save trusts them again.
    """
    folder = Path(folder)
    limit = int(newest[5:]) if newest else None
    rejected: list[Rejected] = []
    for p in reversed(step_folders(folder)):
        if limit is not None and int(p.name[5:]) > limit:
            continue
        problems = verify_checkpoint(p)
        if not problems:
            return p, rejected
        r = Rejected(p.name, problems)
        if quarantine:
            r.moved_to = set_aside(p).name
        rejected.append(r)
    return None, rejected


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
    """Put a verified checkpoint's weights into ``model`` and its state into ``optimizer``; returns trainer_state.

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
    return json.loads((path / TRAINER_STATE).read_text())


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
        )
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
