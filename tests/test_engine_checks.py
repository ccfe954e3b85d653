"""check_model: known-answer checks that decide packing, a shared prefix and logits on targets only.

Low precision must not turn the speed-ups off (bf16 rounding differs between a masked row and the
example alone by ~1e-2), while a model that ignores the segment mask must still be caught; and when a
check does fail, training says what it turned off.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from engine_helpers import random_examples, tiny_llama
from ft.engine import losses
from ft.engine.batching import BatchOptions
from ft.engine.lora import AdapterSpec, apply_adapters
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.trainer import TrainOptions, train


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_checks_pass_at_the_models_precision(dtype: mx.Dtype) -> None:
    model = tiny_llama(layers=4, hidden=128)
    model.set_dtype(dtype)
    split = losses.check_model(model)
    assert split.packing and split.prefix and split.body is not None, split.errors
    assert set(split.errors) == {"head", "packing", "prefix", "unmasked"}
    assert all(0.0 <= split.errors[k] <= split.tolerance for k in ("head", "packing", "prefix"))
    assert split.errors["unmasked"] > 10 * split.tolerance  # the control: without the mask, b sees a
    assert split.tolerance == max(1e-3, 8 * mx.finfo(dtype).eps)
    assert split.disabled() == []
    if dtype == mx.bfloat16:  # the old fixed 1e-3 refused packing here; rounding alone is above it
        assert split.errors["packing"] > 1e-3


def test_a_model_that_ignores_the_segment_mask_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose attention does not use the mask it is handed: packing would leak across examples."""
    model = tiny_llama(layers=2)
    model.set_dtype(mx.bfloat16)
    monkeypatch.setattr(losses.SegmentMask, "make_mask", lambda self, *a, **k: "causal")
    split = losses.check_model(model)
    assert not split.packing
    assert split.errors["packing"] > 10 * split.tolerance  # the leak is far above rounding
    assert split.prefix and split.body is not None  # the other checks are unaffected
    (note,) = split.disabled()
    assert note.startswith("packing several examples per row is off")


def test_a_check_that_cannot_tell_masked_from_unmasked_turns_packing_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the row without the mask gives the same logits, the packed check proves nothing: refused."""
    model = tiny_llama(layers=2)
    real = losses._rel_err
    monkeypatch.setattr(losses, "_rel_err", lambda got, ref: min(real(got, ref), 1e-4))
    split = losses.check_model(model)
    assert not split.packing and split.prefix and split.body is not None
    (note,) = split.disabled()
    assert "do not change without the segment mask" in note


def test_training_reports_what_a_failed_check_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(losses.SegmentMask, "make_mask", lambda self, *a, **k: "causal")
    model = tiny_llama()
    apply_adapters(model, AdapterSpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    starts: list = []

    class Rec:
        def on_train_start(self, e) -> None:  # type: ignore[no-untyped-def]
            starts.append(e)

    opts = TrainOptions(
        BatchOptions(batch_size=4, max_seq_length=64, packing=None), total_steps=2, eval_at_start=False
    )
    res = train(
        model,
        build_optimizer(OptimizerSpec(name="adamw"), 1e-3),
        random_examples(16),
        None,
        opts,
        callbacks=[Rec()],
    )
    (start,) = starts
    assert not start.packing
    assert len(start.notes) == 1 and "packing" in start.notes[0]
    assert start.notes[0] in res.warnings
