"""Gradient checkpointing and out-of-memory recovery on a 2-layer random Llama (float32, CPU)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine_helpers import random_examples, tiny_llama
from ft.engine.batching import BatchOptions, MicroBatchPlan, index_examples, split_micro_batch
from ft.engine.checkpointing import checkpoint_blocks, is_checkpointed
from ft.engine.lora import AdapterSpec, apply_adapters
from ft.engine.memory import is_out_of_memory, simulate_out_of_memory_above
from ft.engine.optim import OptimizerSpec, build_optimizer
from ft.engine.trainer import TrainerState, TrainOptions, train
from ft.errors import ErrorCode, FtError


class Steps:
    def __init__(self) -> None:
        self.steps: list = []

    def on_step(self, e) -> None:
        self.steps.append(e)


def _model(method: str, dropout: float = 0.0):
    model = tiny_llama(seed=3)
    apply_adapters(
        model, AdapterSpec(method=method, rank=4, alpha=8, dropout=dropout, target_modules="all-linear")
    )
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):  # non-zero B: the gradient reaches A too
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1)) * 0.05
    mx.eval(model.parameters())
    return model


def _weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def _run(method, layout, checkpointing, *, steps=1, compile=True, dropout=0.0, batch=4, accum=1, **kw):
    """Train ``steps`` steps with plain SGD at lr 1 (so the update is the gradient itself)."""
    data = random_examples(12, lo=10, hi=40, seed=5, system=16 if layout == "prefix" else 0)
    model = _model(method, dropout)
    opt = build_optimizer(OptimizerSpec(name="sgd", momentum=0.0, weight_decay=0.0), 1.0)
    rec = Steps()
    opts = TrainOptions(
        BatchOptions(
            batch_size=batch,
            grad_accumulation_steps=accum,
            max_seq_length=64,
            packing={"plain": False, "packed": True, "prefix": False}[layout],
            share_prefix=layout == "prefix",
            shuffle=False,
        ),
        total_steps=steps,
        max_grad_norm=0.0,
        eval_at_start=False,
        compile=compile,
        gradient_checkpointing=checkpointing,
        **kw,
    )
    result = train(model, opt, data, None, opts, callbacks=[rec])
    return model, rec, result


@pytest.mark.parametrize(
    "method,layout",
    [("lora", "plain"), ("lora", "packed"), ("lora", "prefix"), ("full", "plain"), ("dora", "packed")],
)
def test_checkpointing_gives_the_same_losses_and_gradients(method: str, layout: str) -> None:
    """Acceptance: with checkpointing, losses and gradients (here: the SGD update) equal those without, 1e-5."""
    out = {}
    for ckpt in (False, True):  # every block recomputed (ft's default keeps the last one as it is)
        model, rec, _ = _run(method, layout, ckpt, steps=2, checkpoint_keep_last=0)
        out[ckpt] = ([s.loss for s in rec.steps], _weights(model))
        assert not is_checkpointed(model)  # the classes are put back after the run
    np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-5, rtol=0)
    for k, w in out[False][1].items():
        np.testing.assert_allclose(out[True][1][k], w, atol=1e-5, rtol=0, err_msg=k)


def test_checkpointed_blocks_recompute_with_the_forwards_dropout_masks() -> None:
    """The backward pass runs each checkpointed block again; with dropout the recomputation uses the
    forward's masks: the gradient equals a finite difference of the same (seeded, so same-mask) loss."""
    import mlx.nn as nn
    from mlx.utils import tree_map, tree_unflatten

    model = _model("lora", dropout=0.3)
    model.train()
    calls = {"n": 0}
    attn = type(model.layers[0].self_attn)
    orig = attn.__call__

    def counting(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)

    x = mx.array(np.random.default_rng(0).integers(3, 128, size=(2, 16)), dtype=mx.int32)

    def loss(m):
        return m(x).astype(mx.float32).square().mean()

    restore = checkpoint_blocks(model, keep_last=0)
    attn.__call__ = counting
    try:
        mx.random.seed(7)
        _, g = nn.value_and_grad(model, loss)(model)
        mx.eval(g)
        assert calls["n"] == 4  # 2 blocks forward + 2 recomputed in the backward pass
        params = model.trainable_parameters()
        d = tree_map(lambda v: mx.random.normal(v.shape, key=mx.random.key(3)), params)
        eps = 3e-3
        vals = []
        for sign in (1, -1):
            model.update(tree_map(lambda p, dv, s=sign: p + s * eps * dv, params, d))
            mx.random.seed(7)
            vals.append(float(loss(model).item()))
        model.update(params)
    finally:
        attn.__call__ = orig
        restore()
    fd = (vals[0] - vals[1]) / (2 * eps)
    analytic = sum(
        float((a * b).sum().item()) for (_, a), (_, b) in zip(tree_flatten(g), tree_flatten(d), strict=True)
    )
    assert abs(fd - analytic) <= 2.5e-3 * max(1.0, abs(analytic)), (fd, analytic)
    assert tree_unflatten(list(tree_flatten(g)))  # non-empty


def test_a_checkpointed_block_asks_no_gradient_of_its_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLX's fused attention on a GPU has no gradient for its mask (packed rows pass one): the checkpointed
    function's inputs are the trainable parameters, prefix keys/values and the hidden states only."""
    import mlx.nn as nn

    import ft.engine.checkpointing as ckpt_mod

    model = _model("lora")
    model.train()
    seen: list[list[int]] = []
    real = mx.checkpoint

    def spy(fn):  # type: ignore[no-untyped-def]
        wrapped = real(fn)

        def call(*args):  # type: ignore[no-untyped-def]
            seen.append([id(v) for _, v in tree_flatten(list(args))])
            return wrapped(*args)

        return call

    monkeypatch.setattr(ckpt_mod.mx, "checkpoint", spy)
    mask = mx.triu(mx.full((16, 16), -1e9), k=1)  # what a packed row's SegmentMask hands the blocks
    x = mx.array(np.random.default_rng(0).integers(3, 128, size=(2, 16)), dtype=mx.int32)
    restore = checkpoint_blocks(model, keep_last=0)
    try:
        h = model.model.embed_tokens(x)

        def loss(h):  # type: ignore[no-untyped-def]
            for layer in model.layers:
                h = layer(h, mask)
            return h.astype(mx.float32).square().mean()

        mx.eval(nn.value_and_grad(model, loss)(h))
    finally:
        restore()
    assert len(seen) == len(model.layers)
    assert all(id(mask) not in ids for ids in seen)


def test_is_out_of_memory_recognises_mlx_messages() -> None:
    assert is_out_of_memory(RuntimeError("[malloc] Unable to allocate 123 bytes."))
    assert is_out_of_memory(
        RuntimeError(
            "[metal::malloc] Attempting to allocate 9 bytes which is greater than the maximum allowed buffer size of 8 bytes."
        )
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("[matmul] shapes do not match"))
    assert not is_out_of_memory(ValueError("Unable to allocate"))


def test_split_micro_batch_keeps_the_examples() -> None:
    data = random_examples(6, lo=10, hi=30, seed=1)
    index = index_examples(data, 64)
    opts = BatchOptions(batch_size=4, max_seq_length=64, coarse_shapes=False)
    rows = MicroBatchPlan(((0,), (1,), (2,)), 32)
    a, b = split_micro_batch(rows, index, opts)
    assert a.rows + b.rows == rows.rows and a.length == b.length == 32
    packed = MicroBatchPlan(((0, 1, 2, 3),), 128)
    a, b = split_micro_batch(packed, index, opts)
    assert sorted(a.rows[0] + b.rows[0]) == [0, 1, 2, 3]
    assert a.length < 128 and b.length < 128
    assert split_micro_batch(MicroBatchPlan(((4,),), 32), index, opts) is None


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_out_of_memory_is_survived_by_splitting(layout: str) -> None:
    """Acceptance: a forced out-of-memory is survived by splitting, with the same final adapter (1e-5)."""
    ref_model, ref_rec, _ = _run("lora", layout, False, steps=3, batch=4)
    biggest = max(s.micro_batches for s in ref_rec.steps)
    assert biggest >= 1
    simulate_out_of_memory_above(64)  # every micro-batch above 64 positions fails
    try:
        model, rec, result = _run("lora", layout, False, steps=3, batch=4)
    finally:
        simulate_out_of_memory_above(None)
    assert result.stopped == "completed"
    assert result.state.micro_batch_limit is not None and result.state.micro_batch_limit <= 64
    assert any("out of memory" in w for w in result.warnings)
    assert rec.steps[0].warning and "split in two" in rec.steps[0].warning
    assert sum(s.micro_batches for s in rec.steps) > sum(s.micro_batches for s in ref_rec.steps)
    np.testing.assert_allclose([s.loss for s in rec.steps], [s.loss for s in ref_rec.steps], atol=1e-5)
    ref = _weights(ref_model)
    for k, w in _weights(model).items():
        np.testing.assert_allclose(w, ref[k], atol=1e-5, rtol=0, err_msg=k)


def test_a_resumed_state_keeps_the_lower_limit() -> None:
    """The limit lives in TrainerState (saved with every checkpoint): a resumed run starts split."""
    state = TrainerState.from_json({**TrainerState().to_json(), "micro_batch_limit": 64})
    data = random_examples(12, lo=10, hi=40, seed=5)
    model = _model("lora")
    opt = build_optimizer(OptimizerSpec(name="sgd", momentum=0.0, weight_decay=0.0), 1.0)
    rec = Steps()
    opts = TrainOptions(
        BatchOptions(batch_size=4, max_seq_length=64, packing=False, shuffle=False),
        total_steps=2,
        eval_at_start=False,
    )
    simulate_out_of_memory_above(64)  # would fail if the limit were not applied from the start
    try:
        result = train(model, opt, data, None, opts, callbacks=[rec], state=state)
    finally:
        simulate_out_of_memory_above(None)
    assert result.stopped == "completed" and not result.warnings
    assert all(s.warning is None for s in rec.steps)


def test_out_of_memory_without_auto_micro_batch_is_a_clear_error() -> None:
    model = _model("lora")
    before = _weights(model)
    simulate_out_of_memory_above(40)
    try:
        with pytest.raises(FtError) as ei:
            _run("lora", "plain", False, steps=2, auto_micro_batch=False)
    finally:
        simulate_out_of_memory_above(None)
    e = ei.value
    assert e.code == ErrorCode.OUT_OF_MEMORY
    assert "auto_micro_batch is false" in e.message and "gradient_checkpointing: true" in e.hint
    # a failed step leaves the weights as they were (nothing half-updated)
    assert set(before) == set(_weights(model))


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo"])
def test_checkpointing_composes_with_preference_objectives(objective: str) -> None:
    """The same preference run with and without checkpointing: same losses and adapters within 1e-5."""
    from engine_helpers import VOCAB
    from ft.engine.batching import ArrayExamples
    from ft.engine.objectives import PreferenceOptions
    from ft.engine.preference import PreferenceData, consecutive_pairs

    rng = np.random.default_rng(0)
    toks, masks, labels = [], [], []
    for _ in range(8):
        prompt = rng.integers(3, VOCAB, size=6)
        for lab, reply in ((1, prompt), (0, rng.integers(3, VOCAB, size=6))):
            toks.append(np.concatenate([prompt, reply]))
            masks.append(np.arange(12) >= 6)
            labels.append(lab)
    pairs = consecutive_pairs(16) if objective != "kto" else None
    data = PreferenceData(ArrayExamples(toks, masks), np.array(labels, np.int8), pairs)
    out = {}
    for ckpt in (False, True):
        model = _model("lora")
        opt = build_optimizer(OptimizerSpec(name="sgd", momentum=0.0, weight_decay=0.0), 1.0)
        rec = Steps()
        opts = TrainOptions(
            BatchOptions(batch_size=4, max_seq_length=32, seed=1, shuffle=False),
            total_steps=2,
            eval_at_start=False,
            max_grad_norm=0.0,
            gradient_checkpointing=ckpt,
        )
        train(model, opt, data, None, opts, objective=PreferenceOptions(objective, beta=0.5), callbacks=[rec])
        out[ckpt] = ([s.loss for s in rec.steps], _weights(model))
    np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-5, rtol=0)
    for k, w in out[False][1].items():
        np.testing.assert_allclose(out[True][1][k], w, atol=1e-5, rtol=0, err_msg=k)


def test_new_shapes_on_a_gpu_are_announced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """CompileEvent before a step with micro-batch shapes not compiled yet (GPU only; forced on here)."""
    from ft.engine import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "_compiles_gpu_kernels", lambda options: True)
    events = []

    class Rec(Steps):
        def on_compile(self, e) -> None:
            events.append(e)

    data = random_examples(16, lo=5, hi=60, seed=2)
    model = _model("lora")
    opt = build_optimizer(OptimizerSpec(), 1e-3)
    opts = TrainOptions(BatchOptions(batch_size=2, max_seq_length=64, seed=3), epochs=2, eval_at_start=False)
    rec = Rec()
    train(model, opt, data, None, opts, callbacks=[rec])
    assert events and events[0].first and events[0].step == 1
    assert all(not e.first for e in events[1:])
    steps = [e.step for e in events]
    assert steps == sorted(set(steps))  # at most one event per step
    # the second epoch reuses the first one's shapes far more than it brings new ones
    per_epoch = len(rec.steps) // 2
    assert sum(st > per_epoch for st in steps) < sum(st <= per_epoch for st in steps)
    assert all(rows >= 1 and positions >= 1 for e in events for rows, positions in e.shapes)
