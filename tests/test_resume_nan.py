"""Acceptance (issue 6): numerical safety.

A poisoned batch at step k (Inf in the inputs' embedding, or a loss hook returning NaN) is caught at
step k: the update is skipped with weights and optimizer moments bitwise unchanged, and the step and the
record ids of its batch are logged. K non-finite steps in a row stop the run with a non-zero exit, and
the last good checkpoint stays intact (and resumable).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine_helpers import random_examples, tiny_llama
from ft.engine.batching import BatchOptions
from ft.engine.callbacks import LogWriter
from ft.engine.checkpoint import CheckpointSaver
from ft.engine.lora import AdapterSpec, apply_adapters
from ft.engine.losses import check_model, make_loss
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.trainer import TrainerState, TrainOptions, train
from ft.workspace.run_folder import pointer_name as read_pointer
from ft.workspace.run_folder import verify_checkpoint
from test_resume_support import (
    DATASET,
    adapters,
    make_workspace,
    output,
    run_id_of,
    set_args,
    settings,
    start_ft,
    train_in_process,
)

K = 3  # the poisoned step


def _model():
    model = tiny_llama(seed=0)
    apply_adapters(model, AdapterSpec(rank=4, alpha=8, dropout=0.0))
    return model


def _snapshot(model, opt) -> dict[str, np.ndarray]:
    out = {f"w.{k}": np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    out.update(
        {f"o.{k}": np.array(v) for k, v in tree_flatten(opt.state) if k not in ("step", "learning_rate")}
    )
    return out


def _bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


class Watch:
    """Snapshots of weights and moments after every step, and the step events."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt
        self.after: dict[int, dict[str, np.ndarray]] = {}
        self.events: dict[int, object] = {}

    def on_step(self, e) -> None:
        self.events[e.step] = e
        self.after[e.step] = _snapshot(self.model, self.opt)


class PoisonEmbedding:
    """Inf in the token embeddings for the steps in ``steps`` (the inputs of those batches are poisoned)."""

    def __init__(self, model, steps: set[int]):
        self.emb, self.steps, self.saved = model.model.embed_tokens, steps, None

    def _set(self, on: bool) -> None:
        if on and self.saved is None:
            self.saved = self.emb.weight
            self.emb.weight = mx.full(self.emb.weight.shape, float("inf"))
        elif not on and self.saved is not None:
            self.emb.weight, self.saved = self.saved, None

    def on_step_end(self, e) -> None:
        self._set(e.step + 1 in self.steps)


def _opts(steps: int, **kw) -> TrainOptions:
    return TrainOptions(
        BatchOptions(batch_size=2, max_seq_length=64),
        total_steps=steps,
        eval_at_start=False,
        eval_steps=100,
        **kw,
    )


def test_inf_in_the_inputs_embedding_skips_exactly_that_step(tmp_path: Path) -> None:
    data = random_examples(24, seed=3)
    clean_model = _model()
    clean_opt = build_optimizer(OptimizerSpec(), 1e-2)
    clean = Watch(clean_model, clean_opt)
    train(clean_model, clean_opt, data, None, _opts(6), callbacks=[clean])

    model = _model()
    opt = build_optimizer(OptimizerSpec(), 1e-2)
    watch = Watch(model, opt)
    logw = LogWriter(tmp_path / "train.log")
    res = train(model, opt, data, None, _opts(6), callbacks=[watch, logw, PoisonEmbedding(model, {K})])
    skipped = [s for s, e in watch.events.items() if e.skipped]
    assert skipped == [K] and res.state.skipped_steps == 1
    assert _bitwise_equal(watch.after[K], watch.after[K - 1]), "weights or moments moved at the poisoned step"
    assert not _bitwise_equal(watch.after[K + 1], watch.after[K])  # training goes on afterwards
    ids = list(watch.events[K].record_ids)
    assert ids and ids == list(clean.events[K].record_ids)  # the batch of step K, by record id
    assert (
        f"step {K}: non-finite loss or gradient, update skipped (weights unchanged); record ids {ids}"
        in (tmp_path / "train.log").read_text()
    )
    assert all(math.isfinite(e.loss) for s, e in watch.events.items() if s != K)
    assert all(np.all(np.isfinite(v)) for v in watch.after[6].values())


def test_a_loss_hook_returning_nan_skips_the_step(tmp_path: Path) -> None:
    """Only the reported loss is NaN (the gradient is finite): the step is still skipped."""
    model = _model()
    opt = build_optimizer(OptimizerSpec(), 1e-2)
    state = TrainerState()
    base = make_loss(check_model(model))

    def hooked(m, *args):
        value, (total, ntok) = base(m, *args)
        if state.step + 1 == K and m.training:
            return value, (total * float("nan"), ntok)
        return value, (total, ntok)

    watch = Watch(model, opt)
    opts = TrainOptions(
        BatchOptions(batch_size=2, max_seq_length=64, packing=False, share_prefix=False),
        total_steps=5,
        eval_at_start=False,
        eval_steps=100,
        compile=False,
    )
    train(model, opt, random_examples(24, seed=4), None, opts, loss=hooked, callbacks=[watch], state=state)
    assert [s for s, e in watch.events.items() if e.skipped] == [K]
    assert _bitwise_equal(watch.after[K], watch.after[K - 1])
    assert math.isnan(watch.events[K].loss) and list(watch.events[K].record_ids)


def test_k_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = _model()
    opt = build_optimizer(OptimizerSpec(), 1e-2)
    state = TrainerState()
    folder = tmp_path / "checkpoints"
    saver = CheckpointSaver(
        folder, model, opt, state, save_steps=2, keep_last=3, adapter_config={}, config={}
    )
    watch = Watch(model, opt)
    # Poisoned from step 4 on; K = 3 (configurable; the default is 5).
    res = train(
        model,
        opt,
        random_examples(40, seed=5),
        None,
        _opts(12, max_skipped_steps=3),
        callbacks=[watch, PoisonEmbedding(model, set(range(4, 13))), saver],
        state=state,
    )
    assert res.stopped == "diverged" and state.step == 6 and state.consecutive_skips == 3
    assert read_pointer(folder, "latest") == "step-000002"  # no save at a skipped step, none at the end
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-000002"]
    assert verify_checkpoint(folder / "step-000002") == []
    saved = {k: np.array(v) for k, v in mx.load(str(folder / "step-000002" / "adapters.safetensors")).items()}
    live = {k[2:]: v for k, v in watch.after[2].items() if k.startswith("w.")}
    assert all(np.array_equal(saved[k], live[k]) for k in saved) and all(
        np.all(np.isfinite(v)) for v in saved.values()
    )


def test_ft_train_exits_non_zero_after_k_non_finite_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The real CLI in a subprocess, poisoned from step 5 on: exit 8, run failed, step-4 intact and resumable."""
    from ft.cli.app import run

    ws = make_workspace(tmp_path / "ws")
    values = settings(12)
    base = train_in_process(ws, "base", values)
    log = tmp_path / "nan.log"
    proc = start_ft(
        ws,
        ["train", "--dataset", DATASET, "--name", "nan", *set_args(values), "--json"],
        log,
        hook="nan-steps:5-12",
        marker=tmp_path / "m",
    )
    assert proc.wait(timeout=300) == 8, output(log)
    err = json.loads(log.read_text())
    assert err["error"] == "training_diverged" and "5 steps in a row" in err["message"]
    assert "last good checkpoint: step-000004" in err["message"]
    run_id = run_id_of(ws, "nan")
    run_dir = ws.run_dir(run_id)
    row = ws.registry().get("runs", id=run_id)
    assert (
        row["status"] == "failed"
        and row["meta"]["stop_reason"] == "diverged"
        and row["meta"]["skipped_steps"] == 5
    )
    text = (run_dir / "train.log").read_text()
    for step in range(5, 10):
        assert (
            f"step {step}: non-finite loss or gradient, update skipped (weights unchanged); record ids ["
            in text
        )
    ck = run_dir / "checkpoints"
    assert read_pointer(ck, "latest") == "step-000004" and verify_checkpoint(ck / "step-000004") == []
    assert not (ck / "step-000006").exists() and not (ck / "step-000008").exists()
    assert all(np.all(np.isfinite(v)) for v in adapters(run_dir, 4).values())
    # `ft runs list` says failed; the last good checkpoint resumes (without the poison) to the same end.
    capsys.readouterr()
    assert run(["--workspace", str(ws.root), "runs", "list", "--json"]) == 0
    statuses = {r["id"]: r["status"] for r in json.loads(capsys.readouterr().out)["runs"]}
    assert statuses[run_id] == "failed"
    assert run(["--workspace", str(ws.root), "train", "--resume", "nan", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["resumed_from"] == "step-000004" and res["status"] == "completed"
    from test_resume_support import assert_same_training

    assert_same_training(Path(base.path), run_dir, 12, 4)
