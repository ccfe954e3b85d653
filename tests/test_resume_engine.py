"""Exact resume at the engine level: a checkpoint loaded into a fresh model and optimizer continues the
run bit for bit, across epoch boundaries, with gradient accumulation, dropout, a warmup + cosine schedule
and each optimizer (their states have different shapes)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine_helpers import random_examples, tiny_llama
from ft.engine.batching import BatchOptions
from ft.engine.checkpoint import CheckpointSaver, load_checkpoint
from ft.engine.lora import AdapterSpec, apply_adapters
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.schedule import make_schedule
from ft.engine.trainer import TrainerState, TrainOptions, train
from ft.errors import FtError
from ft.workspace.run_folder import step_name

STEPS = 9  # 3 epochs of 3 steps (12 examples, 2 x 2 per step)


class Rec:
    def __init__(self) -> None:
        self.steps: dict[int, tuple[float, list[int], float]] = {}
        self.evals: dict[int, float] = {}

    def on_step(self, e) -> None:
        self.steps[e.step] = (e.loss, list(e.record_ids), e.lr)

    def on_eval(self, e) -> None:
        self.evals[e.step] = e.val_loss


def _fresh(opt_name: str):
    model = tiny_llama(seed=0)
    mx.random.seed(5)
    apply_adapters(model, AdapterSpec(rank=4, alpha=8, dropout=0.2, target_modules="all-linear"))
    opt = build_optimizer(
        OptimizerSpec(name=opt_name), make_schedule(kind="cosine", peak=1e-2, warmup=2, total=STEPS)
    )
    return model, opt


def _opts() -> TrainOptions:
    return TrainOptions(
        BatchOptions(batch_size=2, grad_accumulation_steps=2, max_seq_length=64, seed=3),
        total_steps=STEPS,
        eval_steps=3,
    )


def _weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("opt_name", ["adamw", "adafactor", "sgd"])
def test_resume_from_any_step_continues_bit_for_bit(tmp_path: Path, opt_name: str) -> None:
    data, val = random_examples(12, seed=7), random_examples(4, seed=8)
    model, opt = _fresh(opt_name)
    state = TrainerState()
    folder = tmp_path / "ck"
    saver = CheckpointSaver(
        folder, model, opt, state, save_steps=1, keep_last=STEPS, adapter_config={}, config={}
    )
    full = Rec()
    train(model, opt, data, val, _opts(), callbacks=[full, saver], state=state)
    final = _weights(model)
    assert state.epoch == 2 and state.epoch_step == 3  # three epochs went by

    for start in (3, 4, 8):  # at an epoch boundary, inside an epoch, one step before the end
        model, opt = _fresh(opt_name)
        st = TrainerState.from_json(load_checkpoint(folder / step_name(start), model, opt))
        assert st.step == start
        rec = Rec()
        train(model, opt, data, val, _opts(), callbacks=[rec], state=st)
        assert sorted(rec.steps) == list(range(start + 1, STEPS + 1))
        for k, (loss, ids, lr) in rec.steps.items():
            assert ids == full.steps[k][1] and lr == full.steps[k][2], k
            assert abs(loss - full.steps[k][0]) <= 1e-6, (k, loss, full.steps[k][0])
        assert {k: v for k, v in full.evals.items() if k > start} == rec.evals
        got = _weights(model)
        assert max(float(np.max(np.abs(got[k] - final[k]))) for k in final) <= 1e-6


def test_a_checkpoint_of_another_shape_is_refused(tmp_path: Path) -> None:
    model, opt = _fresh("adamw")
    state = TrainerState()
    saver = CheckpointSaver(
        tmp_path, model, opt, state, save_steps=2, keep_last=3, adapter_config={}, config={}
    )
    train(
        model,
        opt,
        random_examples(12, seed=7),
        None,
        TrainOptions(BatchOptions(batch_size=2, max_seq_length=64), total_steps=2, eval_at_start=False),
        callbacks=[saver],
        state=state,
    )
    other = tiny_llama(seed=0)
    apply_adapters(other, AdapterSpec(rank=8, alpha=8, target_modules="all-linear"))  # another rank
    with pytest.raises(FtError) as e:
        load_checkpoint(tmp_path / "step-000002", other, build_optimizer(OptimizerSpec(), 1e-3))
    assert e.value.code.value == "checkpoint_invalid" and "does not fit the model" in e.value.message
    assert "shape" in e.value.message
