"""Acceptance (issue 6): keep the last 3 checkpoints plus the best by validation loss, and early stopping.

The validation loss is planted: a loss hook returns a chosen value per evaluation step (the model is in
eval mode there), so where the minimum lies is known in advance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_helpers import random_examples, tiny_llama
from ft.engine.batching import BatchOptions
from ft.engine.checkpoint import CheckpointSaver
from ft.engine.lora import AdapterSpec, apply_adapters
from ft.engine.losses import check_model, make_loss
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.trainer import TrainerState, TrainOptions, train
from ft.workspace.run_folder import pointer_name as read_pointer
from ft.workspace.run_folder import step_folders, verify_checkpoint


def _run(tmp_path: Path, planted: dict[int, float], steps: int, keep_last: int = 3, **opts):
    model = tiny_llama(seed=0)
    apply_adapters(model, AdapterSpec(rank=4, alpha=8, dropout=0.0))
    opt = build_optimizer(OptimizerSpec(), 1e-2)
    state = TrainerState()
    base = make_loss(check_model(model))

    def loss(m, *args):
        value, (total, ntok) = base(m, *args)
        if not m.training:  # an evaluation: report the planted loss of this step
            return value, (ntok * planted[state.step], ntok)
        return value, (total, ntok)

    folder = tmp_path / "checkpoints"
    saver = CheckpointSaver(
        folder, model, opt, state, save_steps=2, keep_last=keep_last, adapter_config={"x": 1}, config={"y": 2}
    )
    evals: list = []

    class Rec:
        def on_eval(self, e) -> None:
            evals.append((e.step, e.val_loss, e.is_best))

    options = TrainOptions(
        BatchOptions(batch_size=2, max_seq_length=64, packing=False, share_prefix=False),
        total_steps=steps,
        eval_steps=2,
        compile=False,
        **opts,
    )
    res = train(
        model,
        opt,
        random_examples(40, seed=1),
        random_examples(6, seed=2),
        options,
        loss=loss,
        callbacks=[Rec(), saver],
        state=state,
    )
    return res, folder, evals


def test_keep_last_3_plus_the_planted_best(tmp_path: Path) -> None:
    planted = {0: 5.0, 2: 4.0, 4: 1.0, 6: 3.0, 8: 3.5, 10: 2.0, 12: 2.5}
    res, folder, evals = _run(tmp_path, planted, 12)
    assert [(s, v) for s, v, _ in evals] == sorted(planted.items())
    assert [p.name for p in step_folders(folder)] == [
        "step-000004",
        "step-000008",
        "step-000010",
        "step-000012",
    ]
    assert read_pointer(folder, "best") == "step-000004" and read_pointer(folder, "latest") == "step-000012"
    assert res.state.best_step == 4 and res.state.best_val_loss == pytest.approx(1.0)
    assert all(verify_checkpoint(p) == [] for p in step_folders(folder))
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_best_among_the_last_three_keeps_exactly_three(tmp_path: Path) -> None:
    planted = {0: 5.0, 2: 4.0, 4: 3.0, 6: 2.5, 8: 2.0, 10: 1.0, 12: 1.5}
    _, folder, _ = _run(tmp_path, planted, 12)
    assert [p.name for p in step_folders(folder)] == ["step-000008", "step-000010", "step-000012"]
    assert read_pointer(folder, "best") == "step-000010"


def test_early_stopping_after_patience_evaluations_without_min_delta(tmp_path: Path) -> None:
    # Improvements smaller than min_delta (0.1) do not count: 3.0 at step 4 is the last real one.
    planted = {0: 5.0, 2: 4.0, 4: 3.0, 6: 2.95, 8: 2.92, 10: 2.91, 12: 1.0, 14: 0.5, 16: 0.4}
    res, folder, evals = _run(tmp_path, planted, 16, early_stopping_patience=3, early_stopping_min_delta=0.1)
    assert res.stopped == "early-stopped" and res.state.step == 10
    assert [s for s, _, _ in evals] == [0, 2, 4, 6, 8, 10]
    # Best by validation loss is still tracked exactly (2.91 at step 10) and kept.
    assert read_pointer(folder, "best") == "step-000010" and res.state.best_step == 10
    st = json.loads((folder / "step-000010" / "trainer_state.json").read_text())
    assert st["evals_without_improvement"] == 3 and st["early_stop_ref"] == pytest.approx(3.0)


def test_without_patience_the_run_completes(tmp_path: Path) -> None:
    planted = {s: 5.0 + s for s in range(0, 9, 2)}
    res, _, _ = _run(tmp_path, planted, 8)
    assert res.stopped == "completed" and res.state.step == 8


def test_ft_train_early_stopping_is_reported_and_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Through the CLI: an impossible min_delta stops after `patience` evaluations; ft runs list says early-stopped."""
    from ft.cli.app import run
    from test_resume_support import DATASET, make_workspace, set_args, settings

    ws = make_workspace(tmp_path / "ws")
    values = [*settings(12, save=2, evals=2), "early_stopping.patience=2", "early_stopping.min_delta=100"]
    capsys.readouterr()
    code = run(
        [
            "--workspace",
            str(ws.root),
            "train",
            "--dataset",
            DATASET,
            "--name",
            "es",
            *set_args(values),
            "--json",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert code == 0, res
    assert res["status"] == "early-stopped" and res["stop_reason"] == "early-stopped" and res["steps"] == 4
    assert res["best_checkpoint"] is not None
    assert run(["--workspace", str(ws.root), "runs", "list", "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["early-stopped"]
    code = run(["--workspace", str(ws.root), "train", "--resume", "--json"])
    err = json.loads(capsys.readouterr().out)
    assert code == 2 and "stopped early" in err["message"] and "nothing to resume" in err["message"]
