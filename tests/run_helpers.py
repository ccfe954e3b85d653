"""Runs written the way `ft train` writes them, for tests that need a run without training one.

Every checkpoint goes through the engine's own writer (:func:`ft.engine.checkpoint.save_checkpoint`:
manifest, ``config.json`` snapshot, pointers), so readers are tested on the real layout only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft.config.train import TrainConfig
from ft.engine.checkpoint import save_checkpoint
from ft.engine.lora import AdapterSpec, apply_adapters, has_adapters
from ft.workspace import Workspace
from ft.workspace.run_folder import BEST, CHECKPOINTS, set_pointer


def snapshot(base: str, dataset: tuple[str, int] | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """A run snapshot (config.json) for a run of ``base`` on ``dataset``."""
    cfg = TrainConfig.model_validate({"model": {"name": base}, **sections})
    snap: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "sources": {}}
    if dataset is not None:
        snap["dataset"] = {"name": dataset[0], "version": dataset[1]}
    return snap


def write_checkpoint(
    ws: Workspace,
    run_id: str,
    step: int,
    model: Any,
    spec: AdapterSpec,
    base: str,
    *,
    dataset: tuple[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save ``model``'s trainable weights as ``runs/<run_id>/checkpoints/step-N`` (moves ``latest``).

    The adapters of ``spec`` are attached first unless the model has them already (full: nothing).
    """
    import mlx.optimizers as optim

    if spec.method != "full" and not has_adapters(model):
        apply_adapters(model, spec)
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    return save_checkpoint(
        ws.run_dir(run_id) / CHECKPOINTS,
        step,
        model,
        opt,
        {"step": step},
        {"base_model": base, **spec.to_json(), **(extra or {})},
        snapshot(base, dataset),
    )


def record_run(
    ws: Workspace, run_id: str, base: str, *, name: str | None = None, status: str = "completed"
) -> None:
    ws.registry().upsert("runs", {"id": run_id}, name=name, status=status, meta={"model": base})


def set_best(ws: Workspace, run_id: str, step_folder: str) -> None:
    set_pointer(ws.run_dir(run_id) / CHECKPOINTS, BEST, step_folder)
