"""Finding a run's checkpoint and putting it on its base model: shared by `ft evaluate`, `ft export` and serving.

A checkpoint folder (``runs/<id>/checkpoints/step-000040/``) holds the trainable weights
(``adapters.safetensors``: LoRA/DoRA matrices, or every trained weight for full fine-tuning) and
``adapter_config.json`` (method, rank, alpha, targets, base model). The run's ``best`` and ``latest``
pointers name a step folder (a symlink, or a small file holding the folder name).

``--checkpoint`` accepts ``best`` | ``latest`` | ``step-N`` | ``N`` | a folder path; anything that does
not resolve is an :class:`~ft.errors.FtError` that names the run and lists the checkpoints it has.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ft.engine.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTERS,
    BEST,
    CHECKPOINTS,
    CONFIG,
    LATEST,
    MANIFEST,
    verify_checkpoint,
)
from ft.errors import ErrorCode, FtError
from ft.workspace import Workspace

log = logging.getLogger(__name__)

# File names are the engine's (ft.engine.checkpoint writes the folders).
ADAPTER_WEIGHTS = ADAPTERS
RUN_CONFIG = CONFIG  # the resolved train config snapshot: {"config": ..., "dataset": {...}, ...}
POINTERS = (BEST, LATEST)
_STEP_RE = re.compile(r"^(?:step-)?(\d+)$")


class ResolvedCheckpoint(BaseModel):
    """A checkpoint folder and what it needs: the run it belongs to and its base model folder."""

    run_id: str | None
    name: str  # step-000040, or the folder name of a PATH
    path: str
    step: int | None
    base_model: str  # as recorded (name in the workspace, or a path)
    base_model_dir: str
    adapter_config: dict[str, Any]
    requested: str = "best"  # what the user asked for (best, latest, step-N, a path)
    note: str | None = None  # e.g. "no best checkpoint (no validation): used latest"

    @property
    def method(self) -> str:
        return checkpoint_method(self.adapter_config)


# ------------------------------------------------------------------------------------- runs
def resolve_run(ws: Workspace, run: str | None) -> str:
    """A run id from an id, a run name, or None (= the most recent run)."""
    reg = ws.registry()
    if run:
        if reg.get("runs", id=run) is not None or ws.run_dir(run).is_dir():
            return run
        named = [r for r in reg.list("runs") if r.get("name") == run]
        if named:
            return str(named[-1]["id"])
        raise FtError(ErrorCode.NOT_FOUND, f"no run {run!r} in {ws.root}", "list runs with: ft runs list")
    rows = reg.list("runs")
    if rows:
        return str(rows[-1]["id"])
    dirs = sorted(
        (p for p in ws.runs_dir.glob("*") if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    if dirs:
        return dirs[-1].name
    raise FtError(ErrorCode.NOT_FOUND, f"no training runs in {ws.root}", "train one first: ft train")


def _inside(target: Path, ckpts: Path) -> Path | None:
    """``target`` when it is a folder directly inside ``ckpts`` (a pointer never leaves its run)."""
    t = target.resolve()
    return t if t.is_dir() and t.parent == ckpts.resolve() else None


def _pointer(ckpts: Path, name: str) -> Path | None:
    """``checkpoints/best`` or ``latest``: a symlink, a folder, or a file naming the step folder."""
    p = ckpts / name
    if p.is_symlink() or p.is_dir():
        return _inside(p, ckpts)
    for candidate in (p, ckpts / f"{name}.txt", ckpts / f"{name}.json"):
        if candidate.is_file():
            text = candidate.read_text().strip()
            if candidate.suffix == ".json":
                try:
                    data = json.loads(text)
                except json.JSONDecodeError:
                    return None
                text = (
                    str(data.get("checkpoint") or data.get("name") or data.get("path") or "")
                    if isinstance(data, dict)
                    else ""
                )
            if text:
                return _inside(ckpts / text, ckpts)
    return None


def step_dirs(ckpts: Path) -> list[Path]:
    """The ``step-N`` folders of a checkpoints folder, oldest first (temporary/hidden folders skipped)."""
    if not ckpts.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpts.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(ws: Workspace, run: str | None = None, checkpoint: str = "best") -> ResolvedCheckpoint:
    """The checkpoint ``checkpoint`` (best | latest | step-N | N | PATH) of ``run`` (default: latest run).

    ``best`` falls back to ``latest`` only when the run has no best pointer (trained without validation),
    and says so in ``note``. Raises FtError naming the run and listing the checkpoints that exist.
    """
    spec = (checkpoint or "best").strip()
    as_path = Path(spec).expanduser()
    run_id: str | None
    note = None
    if (as_path.is_dir() and (as_path / ADAPTER_WEIGHTS).is_file()) or os.sep in spec or spec.startswith("."):
        if not as_path.is_dir():
            raise FtError(
                ErrorCode.NOT_FOUND,
                f"checkpoint folder {as_path} does not exist",
                "pass best, latest, step-N or the path of a checkpoint folder",
            )
        if not (as_path / ADAPTER_WEIGHTS).is_file():
            raise FtError(
                ErrorCode.NOT_FOUND,
                f"{as_path} is not a checkpoint folder (no {ADAPTER_WEIGHTS})",
                "point --checkpoint at a runs/<id>/checkpoints/step-N folder",
            )
        path = as_path.resolve()
        run_id = path.parent.parent.name if path.parent.name == CHECKPOINTS else None
        if run is not None:
            run_id = resolve_run(ws, run)
    else:
        run_id = resolve_run(ws, run)
        ckpts = ws.run_dir(run_id) / CHECKPOINTS
        steps = step_dirs(ckpts)
        found: Path | None
        if spec in POINTERS:
            found = _pointer(ckpts, spec)
            if found is None and spec == "latest" and steps:
                found = steps[-1]
            if found is None and spec == "best" and steps:
                found = _pointer(ckpts, "latest") or steps[-1]
                note = (
                    f"run {run_id} has no best checkpoint (no validation loss); used the latest, {found.name}"
                )
                log.warning(note)
        elif m := _STEP_RE.match(spec):
            want = int(m.group(1))
            found = next((p for p in steps if int(_STEP_RE.match(p.name).group(1)) == want), None)  # type: ignore[union-attr]
        else:
            raise FtError(
                ErrorCode.USAGE,
                f"--checkpoint {spec!r} is not best, latest, step-N or a folder",
                "e.g. --checkpoint best, --checkpoint step-100 or --checkpoint runs/<id>/checkpoints/step-000100",
            )
        if found is None:
            have = ", ".join(p.name for p in steps) or "none"
            raise FtError(
                ErrorCode.NOT_FOUND,
                f"run {run_id} has no checkpoint {spec!r} (checkpoints: {have})",
                "pick one with --checkpoint best|latest|step-N, or train the run further",
            )
        path = found
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path} has no {ADAPTER_WEIGHTS}",
            "the checkpoint is incomplete; pick another with --checkpoint",
        )
    if (path / MANIFEST).is_file():
        # Sizes and safetensors headers against ft's manifest (no hashing: loading stays quick for full weights).
        problems = verify_checkpoint(path, hashes=False)
        if problems:
            raise FtError(
                ErrorCode.CHECKPOINT_INVALID,
                f"checkpoint {path} is damaged: " + "; ".join(problems),
                "pick another with --checkpoint (e.g. step-N); ft train --resume sets damaged ones aside",
            )
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path / ADAPTER_CONFIG}: {e}",
            "the checkpoint is incomplete; pick another with --checkpoint",
        ) from e
    if not isinstance(cfg, dict):
        raise FtError(ErrorCode.CHECKPOINT_INVALID, f"{path / ADAPTER_CONFIG} is not a JSON object")
    base = _base_model_name(cfg, ws, run_id)
    base_dir = _base_model_dir(ws, base, path)
    m = _STEP_RE.match(path.name)
    return ResolvedCheckpoint(
        run_id=run_id,
        name=path.name,
        path=str(path),
        step=int(m.group(1)) if m else None,
        base_model=base,
        base_model_dir=str(base_dir),
        adapter_config=cfg,
        requested=spec,
        note=note,
    )


def _base_model_name(cfg: dict[str, Any], ws: Workspace, run_id: str | None) -> str:
    for key in ("base_model", "model", "base_model_name_or_path", "model_name"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("name") or value.get("path")
        if isinstance(value, str) and value:
            return value
    if run_id:
        row = ws.registry().get("runs", id=run_id)
        meta = (row or {}).get("meta") or {}
        for key in ("model", "base_model"):
            if isinstance(meta.get(key), str):
                return meta[key]
    raise FtError(
        ErrorCode.CHECKPOINT_INVALID,
        "the checkpoint does not say which base model it was trained on",
        f"its {ADAPTER_CONFIG} needs a base_model entry",
    )


def _base_model_dir(ws: Workspace, base: str, ckpt: Path) -> Path:
    candidates = []
    try:
        candidates.append(ws.model_dir(base))
    except FtError:
        pass
    candidates += [Path(base).expanduser(), ckpt / base]
    for c in candidates:
        if (c / "config.json").is_file():
            return c.resolve()
    raise FtError(
        ErrorCode.NOT_FOUND,
        f"the base model {base!r} of this checkpoint is not in {ws.models_dir}",
        f"pull it again: ft models pull {base}",
    )


# ---------------------------------------------------------------------------------- adapters
def adapter_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Adapter hyper-parameters from ft's adapter_config.json (flat or under adapter/lora/spec)."""
    for key in ("adapter", "lora", "spec"):
        if isinstance(cfg.get(key), dict) and ("rank" in cfg[key] or "method" in cfg[key]):
            return cfg[key]
    return cfg


def checkpoint_method(cfg: dict[str, Any]) -> str:
    """lora | dora | qlora | full (an mlx-lm adapter folder reports its fine_tune_type)."""
    if "lora_parameters" in cfg:
        return str(cfg.get("fine_tune_type", "lora"))
    fields = adapter_fields(cfg)
    return str(fields.get("method") or cfg.get("method") or "lora")


def _flat(tree: Any) -> dict[str, Any]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(tree))


def has_adapters(model: Any) -> bool:
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    return any(isinstance(m, LoRALinear | DoRALinear) for _, m in model.named_modules())


def attach_adapters(model: Any, ckpt: ResolvedCheckpoint, *, as_trained: bool = True) -> str:
    """Give ``model`` the checkpoint's adapter layers at their initial state (in place); returns the method.

    The update starts at zero (B = 0), so the model still computes its base. With ``as_trained`` a QLoRA
    checkpoint on a float base quantizes the base as training did (so base and tuned share weights);
    ``as_trained=False`` keeps float weights (export merges into float). Nothing to do for full
    fine-tuning, or when adapters are already attached.
    """
    from ft.engine.lora import AdapterSpec, apply_adapters

    cfg = ckpt.adapter_config
    method = checkpoint_method(cfg)
    if method not in ("lora", "dora", "qlora", "full"):
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID, f"{Path(ckpt.path) / ADAPTER_CONFIG}: unknown method {method!r}"
        )
    if method == "full" or "lora_parameters" in cfg or has_adapters(model):
        return method
    fields = adapter_fields(cfg)
    targets = fields.get("target_modules", ("q_proj", "v_proj"))
    layers = fields.get("layers", "all")
    spec = AdapterSpec(
        method="lora" if method == "qlora" and not as_trained else method,  # type: ignore[arg-type]
        rank=int(fields.get("rank", 16)),
        alpha=float(fields.get("alpha", 32.0)),
        dropout=0.0,  # inference: dropout off
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        layers=layers if layers == "all" else int(layers),
        quant_bits=int(fields.get("quant_bits", 4)),
        quant_group_size=int(fields.get("quant_group_size", 64)),
    )
    apply_adapters(model, spec)
    model.eval()
    return method


def load_checkpoint_weights(model: Any, ckpt: ResolvedCheckpoint) -> None:
    """Load the checkpoint's trained tensors into ``model`` (adapters attached first for lora/dora/qlora).

    Every tensor name and shape is checked against the model, and all mismatches are reported at once.
    """
    import mlx.core as mx

    path = Path(ckpt.path)
    method = checkpoint_method(ckpt.adapter_config)
    try:
        weights = mx.load(str(path / ADAPTER_WEIGHTS))
    except Exception as e:  # MLX raises RuntimeError/ValueError for a damaged file
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path / ADAPTER_WEIGHTS} cannot be read: {e}",
            "the checkpoint is damaged; pick another with --checkpoint",
        ) from e
    params = _flat(model.parameters())
    problems = [f"{k}: not in the model" for k in weights if k not in params]
    problems += [
        f"{k}: shape {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in weights.items()
        if k in params and tuple(v.shape) != tuple(params[k].shape)
    ]
    if method != "full":
        expected = [k for k in params if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")]
        problems += [f"{k}: missing from the file" for k in expected if k not in weights]
    if problems:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path / ADAPTER_WEIGHTS} does not fit its base model: "
            + "; ".join(problems[:6])
            + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""),
            "was the base model re-pulled with a different architecture?",
        )
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    model.eval()


def apply_checkpoint(model: Any, ckpt: ResolvedCheckpoint, *, as_trained: bool = True) -> str:
    """Put the checkpoint on ``model`` (in place): adapters for lora/dora/qlora, the trained weights
    themselves for full fine-tuning. Returns the method. Dropout is off (inference)."""
    cfg = ckpt.adapter_config
    if "lora_parameters" in cfg:  # an mlx-lm adapter folder (mlx_lm.lora --adapter-path)
        from mlx_lm.tuner.utils import load_adapters

        try:
            load_adapters(model, str(ckpt.path))
        except ValueError as e:
            raise FtError(ErrorCode.CHECKPOINT_INVALID, f"{ckpt.path}: {e}") from e
        model.eval()
        return str(cfg.get("fine_tune_type", "lora"))
    method = attach_adapters(model, ckpt, as_trained=as_trained)
    load_checkpoint_weights(model, ckpt)
    return method
