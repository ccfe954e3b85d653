"""Finding a run's checkpoint and putting it on its base model: shared by `ft evaluate`, `ft export` and `ft serve`.

The folder layout, pointers and the ``best`` fallback are :mod:`ft.workspace.run_folder`'s; this module
adds the workspace: which run (id, name or the newest), the checkpoint's base model among the workspace's
models, the manifest check, and the adapters put back on a loaded model.

``--checkpoint`` accepts ``best`` | ``latest`` | ``step-N`` | ``N`` | a folder path; anything that does
not resolve is an :class:`~ft.errors.FtError` that names the run and lists the checkpoints it has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ft.errors import ErrorCode, FtError
from ft.services.run_record import RunSnapshot
from ft.workspace import Workspace
from ft.workspace import run_folder as rf

log = logging.getLogger(__name__)

METHODS = ("lora", "dora", "qlora", "full")


class ResolvedCheckpoint(BaseModel):
    """A checkpoint folder and what it needs: the run it belongs to and its base model folder."""

    run_id: str | None
    name: str  # step-000040, or the folder name of a PATH
    path: str
    step: int | None
    base_model: str  # as recorded in adapter_config.json (a workspace name, a catalog name or a repo id)
    base_model_id: str  # the workspace's name for that model (what `ft models list` and `ft serve` show)
    base_model_dir: str
    adapter_config: dict[str, Any]
    base_trusted: bool = False  # the base model was pulled with --trust-remote-code
    requested: str = "best"  # what the user asked for (best, latest, step-N, a path)
    note: str | None = None  # e.g. "no best checkpoint (no validation): used latest"
    snapshot: RunSnapshot | None = None
    """The settings this checkpoint was trained with (its config.json, else the run's)."""

    def load_base(self, purpose: str, *, keep_quantized: bool = False) -> Any:
        """The base model, loaded for ``purpose`` as the run was trained (dtype, custom code, QLoRA)."""
        from ft.models.loading import load_for

        model = self.snapshot.config.model if self.snapshot is not None else None
        return load_for(
            self.base_model_dir,
            purpose,  # type: ignore[arg-type]
            method=self.method,
            dtype=model.dtype if model is not None else "auto",
            trust_remote_code=(model is not None and model.trust_remote_code) or self.base_trusted,
            keep_quantized=keep_quantized,
        )

    @property
    def method(self) -> str:
        return str(self.adapter_config.get("method") or "lora")

    def spec(self) -> Any:
        """The checkpoint's :class:`~ft.engine.lora.AdapterSpec` (what training built)."""
        from ft.engine.lora import AdapterSpec

        try:
            return AdapterSpec.from_json(self.adapter_config)
        except ValueError as e:
            raise FtError(
                ErrorCode.CHECKPOINT_INVALID,
                f"{Path(self.path) / rf.ADAPTER_CONFIG}: {e}",
                "the checkpoint was not written by ft train; pick another with --checkpoint",
            ) from None


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


def _is_path(spec: str) -> bool:
    as_path = Path(spec).expanduser()
    return os.sep in spec or spec.startswith(".") or (as_path / rf.ADAPTERS).is_file()


def _find(ws: Workspace, run: str | None, spec: str) -> tuple[str | None, Path, str | None]:
    """(run id, step folder, note) for ``spec`` of ``run``."""
    if _is_path(spec):
        as_path = Path(spec).expanduser()
        if not as_path.is_dir():
            raise FtError(
                ErrorCode.NOT_FOUND,
                f"checkpoint folder {as_path} does not exist",
                "pass best, latest, step-N or the path of a checkpoint folder",
            )
        if not (as_path / rf.ADAPTERS).is_file():
            raise FtError(
                ErrorCode.NOT_FOUND,
                f"{as_path} is not a checkpoint folder (no {rf.ADAPTERS})",
                "point --checkpoint at a runs/<id>/checkpoints/step-N folder",
            )
        path = as_path.resolve()
        run_id = path.parent.parent.name if path.parent.name == rf.CHECKPOINTS else None
        return (resolve_run(ws, run) if run is not None else run_id), path, None
    run_id = resolve_run(ws, run)
    ckpts = ws.run_dir(run_id) / rf.CHECKPOINTS
    try:
        found = rf.resolve(ckpts, spec)
    except ValueError:
        raise FtError(
            ErrorCode.USAGE,
            f"--checkpoint {spec!r} is not best, latest, step-N or a folder",
            "e.g. --checkpoint best, --checkpoint step-100 or --checkpoint runs/<id>/checkpoints/step-000100",
        ) from None
    if found is None:
        have = ", ".join(p.name for p in rf.step_folders(ckpts)) or "none"
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"run {run_id} has no checkpoint {spec!r} (checkpoints: {have})",
            "pick one with --checkpoint best|latest|step-N, or train the run further",
        )
    note = f"run {run_id}: {found.note}" if found.note else None
    if note:
        log.warning("%s", note)
    return run_id, found.path, note


def resolve_checkpoint(ws: Workspace, run: str | None = None, checkpoint: str = "best") -> ResolvedCheckpoint:
    """The checkpoint ``checkpoint`` (best | latest | step-N | N | PATH) of ``run`` (default: latest run),
    checked against its manifest (sizes and safetensors headers) and with its base model found.

    ``best`` falls back to ``latest`` only when the run has no best pointer (trained without validation),
    and says so in ``note``. Raises FtError naming the run and listing the checkpoints that exist.
    """
    spec = (checkpoint or rf.BEST).strip()
    run_id, path, note = _find(ws, run, spec)
    # Sizes and safetensors headers against ft's manifest (no hashing: loading stays quick for full weights).
    problems = rf.verify_checkpoint(path, hashes=False)
    if problems:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"checkpoint {path} is damaged: " + "; ".join(problems),
            "pick another with --checkpoint (e.g. step-N); ft train --resume sets damaged ones aside",
        )
    try:
        cfg = json.loads((path / rf.ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path / rf.ADAPTER_CONFIG}: {e}",
            "the checkpoint is incomplete; pick another with --checkpoint",
        ) from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("base_model"), str):
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path / rf.ADAPTER_CONFIG} does not say which base model it was trained on",
            "the checkpoint was not written by ft train; pick another with --checkpoint",
        )
    if cfg.get("method", "lora") not in METHODS:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID, f"{path / rf.ADAPTER_CONFIG}: unknown method {cfg['method']!r}"
        )
    base_id, base_dir, trusted = base_model_of(ws, cfg["base_model"])
    places = [path / rf.CONFIG] + ([ws.run_dir(run_id) / rf.CONFIG] if run_id else [])
    return ResolvedCheckpoint(
        run_id=run_id,
        name=path.name,
        path=str(path),
        step=rf.parse_step(path.name),
        base_model=cfg["base_model"],
        base_model_id=base_id,
        base_model_dir=str(base_dir),
        base_trusted=trusted,
        adapter_config=cfg,
        requested=spec,
        note=note,
        snapshot=RunSnapshot.find(*places),
    )


def base_model_of(ws: Workspace, base: str) -> tuple[str, Path, bool]:
    """(workspace name, folder, pulled with --trust-remote-code) of the model a checkpoint names: a pulled
    model by name or by its source (catalog name, repo id), else an unregistered folder under models/."""
    from ft.services.models import find_row

    row = find_row(ws, base) if ws.db_path.exists() else None
    candidates: list[tuple[str, str | Path, bool]] = []
    if row is not None:
        meta = row.get("meta") or {}
        candidates.append(
            (row["name"], meta.get("path") or ws.model_dir(row["name"]), bool(meta.get("trust_remote_code")))
        )
    with contextlib.suppress(FtError):  # an unregistered folder under models/
        candidates.append((base, ws.model_dir(base), False))
    for name, folder, trusted in candidates:
        if (Path(folder) / "config.json").is_file():
            return name, Path(folder), trusted
    raise FtError(
        ErrorCode.NOT_FOUND,
        f"the base model {base!r} of this checkpoint is not in {ws.models_dir}",
        f"pull it again: ft models pull {base}",
    )


# ---------------------------------------------------------------------------------- adapters
def attach_adapters(model: Any, ckpt: ResolvedCheckpoint, *, as_trained: bool = True) -> str:
    """Give ``model`` the checkpoint's adapter layers at their initial state (in place); returns the method.

    The update starts at zero (B = 0), so the model still computes its base. With ``as_trained`` a QLoRA
    checkpoint on a float base quantizes the base as training did (so base and tuned share weights);
    ``as_trained=False`` keeps float weights (export merges into float). Nothing to do for full
    fine-tuning, or when adapters are already attached.
    """
    import dataclasses

    from ft.engine.lora import apply_adapters, has_adapters

    method = ckpt.method
    if method == "full" or has_adapters(model):
        return method
    spec = ckpt.spec()
    spec = dataclasses.replace(
        spec,
        method="lora" if method == "qlora" and not as_trained else spec.method,
        dropout=0.0,  # inference: dropout off
    )
    apply_adapters(model, spec)
    model.eval()
    return method


def load_checkpoint_weights(model: Any, ckpt: ResolvedCheckpoint) -> None:
    """Load the checkpoint's trained tensors into ``model`` (adapters attached first for lora/dora/qlora).

    Every tensor name and shape is checked against the model, and all mismatches are reported at once.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    path = Path(ckpt.path)
    try:
        weights = mx.load(str(path / rf.ADAPTERS))
    except Exception as e:  # MLX raises RuntimeError/ValueError for a damaged file
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path / rf.ADAPTERS} cannot be read: {e}",
            "the checkpoint is damaged; pick another with --checkpoint",
        ) from e
    assert isinstance(weights, dict)
    params = dict(tree_flatten(model.parameters()))
    problems = [f"{k}: not in the model" for k in weights if k not in params]
    problems += [
        f"{k}: shape {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in weights.items()
        if k in params and tuple(v.shape) != tuple(params[k].shape)
    ]
    if ckpt.method != "full":
        expected = [k for k in params if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")]
        problems += [f"{k}: missing from the file" for k in expected if k not in weights]
    if problems:
        raise FtError(
            ErrorCode.CHECKPOINT_INVALID,
            f"{path / rf.ADAPTERS} does not fit its base model: "
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
    method = attach_adapters(model, ckpt, as_trained=as_trained)
    load_checkpoint_weights(model, ckpt)
    return method
