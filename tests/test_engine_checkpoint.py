"""Checkpoints written by a real training run: layout, pointers, keep-last, nothing non-finite."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine_helpers import random_examples, tiny_llama
from ft.engine.batching import BatchOptions
from ft.engine.checkpoint import CheckpointSaver, save_checkpoint
from ft.engine.lora import AdapterSpec, apply_adapters, trainable_weights
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.trainer import TrainerState, TrainOptions, train
from ft.errors import FtError
from ft.workspace.run_folder import (
    ADAPTER_CONFIG,
    ADAPTERS,
    MANIFEST,
    OPTIMIZER,
    TRAINER_STATE,
    step_folders,
)
from ft.workspace.run_folder import pointer_name as read_pointer


def test_saver_keeps_last_n_plus_best_and_files_describe_themselves(tmp_path: Path) -> None:
    model = tiny_llama()
    spec = AdapterSpec(rank=4, alpha=8)
    apply_adapters(model, spec)
    opt = build_optimizer(OptimizerSpec(), 1e-2)
    state = TrainerState()
    folder = tmp_path / "checkpoints"
    saver = CheckpointSaver(
        folder,
        model,
        opt,
        state,
        save_steps=2,
        keep_last=2,
        adapter_config={"base_model": "tiny", **spec.to_json()},
        config={"x": 1},
    )
    evals: list = []

    class Rec:
        def on_eval(self, e) -> None:
            evals.append(e)

    opts = TrainOptions(
        BatchOptions(batch_size=4, max_seq_length=64), total_steps=9, eval_steps=3, eval_at_start=False
    )
    train(
        model,
        opt,
        random_examples(40, seed=1),
        random_examples(8, seed=2),
        opts,
        callbacks=[Rec(), saver],
        state=state,
    )
    names = [p.name for p in step_folders(folder)]
    best_step = min(evals, key=lambda e: e.val_loss).step
    assert read_pointer(folder, "latest") == "step-000009"
    assert read_pointer(folder, "best") == f"step-{best_step:06d}"
    # the last 2 plus the best (when it is older)
    expected = {"step-000008", "step-000009", f"step-{best_step:06d}"}
    assert set(names) == expected
    final = folder / "step-000009"
    for name in (ADAPTERS, ADAPTER_CONFIG, OPTIMIZER, TRAINER_STATE, MANIFEST):
        assert (final / name).is_file(), name
    saved = mx.load(str(final / ADAPTERS))
    live = trainable_weights(model)
    assert set(saved) == set(live) and all(
        np.array_equal(np.array(saved[k]), np.array(live[k])) for k in live
    )
    st = json.loads((final / TRAINER_STATE).read_text())
    assert st["step"] == 9 and st["examples_seen"] == 36
    man = json.loads((final / MANIFEST).read_text())
    assert set(man["files"]) == {ADAPTERS, ADAPTER_CONFIG, OPTIMIZER, TRAINER_STATE, "config.json"}
    assert "step" in mx.load(str(final / OPTIMIZER))
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())


def test_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    model = tiny_llama()
    apply_adapters(model, AdapterSpec(rank=2, alpha=2))
    opt = build_optimizer(OptimizerSpec(), 1e-2)
    opt.init(model.trainable_parameters())
    layer = model.layers[0].self_attn.q_proj
    layer.lora_b = mx.full(layer.lora_b.shape, float("nan"))
    with pytest.raises(FtError) as e:
        save_checkpoint(tmp_path, 5, model, opt, {}, {}, {})
    assert "non-finite" in e.value.message
    assert not any(tmp_path.iterdir())
