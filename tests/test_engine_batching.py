"""Batch planning: every example once per epoch, bucketed shapes, packing that changes no example's loss."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine_helpers import random_examples, reference_example_loss, tiny_llama
from ft.engine.batching import (
    ArrayExamples,
    BatchOptions,
    bucket,
    collate,
    index_examples,
    plan_epoch,
    plan_eval,
    plan_stats,
)
from ft.engine.losses import check_model, token_ce
from ft.errors import FtError


def test_bucket_ladder() -> None:
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129, 200, 257, 1000, 2048, 2049)] == [
        16,
        16,
        32,
        112,
        128,
        144,
        208,
        288,
        1024,
        2048,
        2304,
    ]
    for n in range(1, 5000, 7):  # never below n, at most 1/8 (or 16) above
        b = bucket(n)
        assert n <= b <= max(n + 15, int(n * 1.125) + 1)


@pytest.mark.parametrize("packing", [None, True, False])
def test_epoch_plan_covers_every_usable_example_once_and_is_deterministic(packing: bool | None) -> None:
    data = random_examples(103, lo=3, hi=90, seed=1)
    opts = BatchOptions(batch_size=4, grad_accumulation_steps=2, max_seq_length=64, packing=packing, seed=7)
    idx = index_examples(data, opts.max_seq_length)
    plans = plan_epoch(idx, opts, epoch=0)
    seen = [i for p in plans for mb in p.micro_batches for row in mb.rows for i in row]
    assert sorted(seen) == sorted(idx.usable.tolist())
    assert (
        all(len(p.examples) <= 8 for p in plans)
        and sum(len(p.examples) == 8 for p in plans) == len(plans) - 1
    )
    assert plan_epoch(idx, opts, 0) == plans  # same seed and epoch: same plan (exact resume relies on it)
    assert plan_epoch(idx, opts, 1) != plans  # a new epoch reshuffles
    for p in plans:
        for mb in p.micro_batches:
            rows, R = mb.shape
            assert R == bucket(R) and R <= opts.max_row
            assert rows * R <= opts.token_budget
            for row in mb.rows:
                assert sum(int(idx.positions[i]) for i in row) <= R
            if packing is False:
                assert all(len(r) == 1 for r in mb.rows) and rows <= opts.batch_size
    st = plan_stats(plans, idx)
    assert st.real_positions == int(idx.positions[idx.usable].sum())
    if packing is not False:
        assert st.padding_fraction < 0.25


def test_truncation_and_untrainable_examples_are_left_out() -> None:
    toks = [np.arange(3, 13), np.arange(3, 103), np.array([5]), np.arange(3, 9)]
    masks = [np.arange(10) >= 5, np.arange(100) >= 90, np.array([True]), np.zeros(6, bool)]
    data = ArrayExamples(toks, masks)
    idx = index_examples(data, max_seq_length=50)
    assert idx.positions.tolist() == [9, 50, 0, 5]
    assert idx.trained.tolist() == [5, 0, 0, 0]  # example 1's trained tail lies past the limit
    assert idx.usable.tolist() == [0]
    with pytest.raises(FtError):
        plan_epoch(index_examples(ArrayExamples([np.arange(5)], [np.zeros(5, bool)]), 50), BatchOptions(2), 0)


def test_collate_lays_out_tokens_segments_and_targets() -> None:
    data = ArrayExamples([[10, 11, 12, 13], [20, 21, 22]], [[False, False, True, True], [False, True, True]])
    idx = index_examples(data, 64)
    from ft.engine.batching import MicroBatchPlan

    mb = collate(data, MicroBatchPlan(((0, 1),), 16), idx, pad_id=0, target_step=16)
    assert mb.inputs[0, :5].tolist() == [10, 11, 12, 20, 21] and mb.inputs[0, 5:].tolist() == [0] * 11
    assert mb.segments is not None and mb.segments[0].tolist() == [1, 1, 1, 2, 2] + [3] * 11
    k = mb.n_trained
    assert k == 4 and mb.n_tokens == 5
    assert mb.positions[:k].tolist() == [1, 2, 3, 4] and mb.labels[:k].tolist() == [12, 13, 21, 22]
    assert mb.weights.tolist() == [1.0] * 4 + [0.0] * 12


@pytest.mark.parametrize("layout", ["packed", "grouped", "shared-prefix"])
def test_packed_and_grouped_batches_give_each_example_its_unpadded_loss(layout: str) -> None:
    """Acceptance: packing/grouping gives the same per-example loss as unpadded single examples."""
    model = tiny_llama(seed=1)
    model.eval()
    split = check_model(model)
    assert split.packing and split.prefix and split.body is not None
    data = random_examples(12, lo=4, hi=30, seed=5, system=37 if layout == "shared-prefix" else 0)
    idx = index_examples(data, 96)
    opts = BatchOptions(
        batch_size=12, max_seq_length=96, packing=layout == "packed", share_prefix=layout == "shared-prefix"
    )
    (step,) = plan_eval(idx, opts)
    assert any(mb.packed for mb in step.micro_batches) == (layout == "packed")
    assert all(mb.prefix == (32 if layout == "shared-prefix" else 0) for mb in step.micro_batches)
    per_example: dict[int, list[float]] = {}
    for mbp in step.micro_batches:
        mb = collate(data, mbp, idx, target_step=16)
        segs = None if mb.segments is None else mx.array(mb.segments)
        pre = None if mb.prefix is None else mx.array(mb.prefix)
        ce = np.array(
            token_ce(
                model, split, mx.array(mb.inputs), segs, mx.array(mb.positions), mx.array(mb.labels), pre
            )
        )
        # attribute each target back to its example through the row layout
        R = mbp.length
        for r, row in enumerate(mbp.rows):
            start = 0
            for i in row:
                p = int(idx.positions[i]) - mbp.prefix
                lo, hi = r * R + start, r * R + start + p
                sel = (mb.positions[: mb.n_trained] >= lo) & (mb.positions[: mb.n_trained] < hi)
                per_example[i] = ce[: mb.n_trained][sel].tolist()
                start += p
    assert sorted(per_example) == list(range(12))
    for i, ces in per_example.items():
        ref, n = reference_example_loss(model, data.tokens(i), data.mask(i))
        assert len(ces) == n
        assert abs(float(np.mean(ces)) - ref) < 2e-5, (i, np.mean(ces), ref)


def test_shared_prefix_detection() -> None:
    from ft.engine.batching import PREFIX_STEP, shared_prefix

    data = random_examples(6, lo=20, hi=30, seed=9, system=40)
    idx = index_examples(data, 128)
    assert shared_prefix(range(6), idx) == 40 // PREFIX_STEP * PREFIX_STEP
    assert shared_prefix([0], idx) == 0  # nothing to share with
    other = random_examples(2, lo=20, hi=30, seed=10, system=40)  # a different "system prompt"
    mixed = ArrayExamples([data.tokens(0), other.tokens(0)], [data.mask(0), other.mask(0)])
    assert shared_prefix([0, 1], index_examples(mixed, 128)) == 0
    # the prefix stops before the first trained prediction
    short = ArrayExamples(
        [data.tokens(0), data.tokens(1)],
        [np.arange(len(data.tokens(0))) > 20, np.arange(len(data.tokens(1))) > 20],
    )
    assert shared_prefix([0, 1], index_examples(short, 128)) == 16
    opts = BatchOptions(batch_size=6, max_seq_length=128, share_prefix=True, packing=False)
    (step,) = plan_eval(idx, opts)
    st = plan_stats([step], idx)
    assert st.prefix_saved_positions == 5 * 40 and st.padded_positions < st.real_positions


def test_packing_without_segment_mask_would_leak() -> None:
    """The segment mask is what keeps packed examples apart (so the test above can fail)."""
    model = tiny_llama(seed=1)
    model.eval()
    a, b = np.arange(3, 11, dtype=np.int32), np.arange(20, 27, dtype=np.int32)
    alone = np.array(model(mx.array(b[None])))
    together = np.array(model(mx.array(np.concatenate([a, b])[None])))[:, len(a) :]
    assert not np.allclose(alone, together, atol=1e-3)


def test_compile_aware_planning_reuses_shapes_and_groups_prefixes() -> None:
    a = random_examples(40, lo=10, hi=60, seed=11, system=30)
    b = random_examples(40, lo=10, hi=60, seed=12, system=30)  # another "system prompt"
    data = ArrayExamples(
        [*(a.tokens(i) for i in range(40)), *(b.tokens(i) for i in range(40))],
        [*(a.mask(i) for i in range(40)), *(b.mask(i) for i in range(40))],
    )
    idx = index_examples(data, 128)
    free = BatchOptions(
        batch_size=4, grad_accumulation_steps=2, max_seq_length=128, share_prefix=True, compile_penalty=0.0
    )
    aware = BatchOptions(batch_size=4, grad_accumulation_steps=2, max_seq_length=128, share_prefix=True)
    s_free, s_aware = plan_stats(plan_epoch(idx, free, 0), idx), plan_stats(plan_epoch(idx, aware, 0), idx)
    assert len(s_aware.shapes) < len(s_free.shapes)
    # both system prompts are shared within their own micro-batches
    plans = plan_epoch(idx, aware, 0)
    prefixed = [mb for p in plans for mb in p.micro_batches if mb.prefix]
    assert prefixed and s_aware.prefix_saved_positions > 0
    for mb in prefixed:
        first = {int(data.tokens(r[0])[0]) for r in mb.rows}
        assert len(first) == 1  # one system prompt per prefix micro-batch


def test_packing_true_means_packed_rows_only() -> None:
    """training.packing: true packs every step (no one-per-row or shared-prefix layout); auto may not."""
    data = random_examples(48, lo=10, hi=40, seed=13, system=30)
    idx = index_examples(data, 128)
    common = dict(batch_size=4, grad_accumulation_steps=2, max_seq_length=128, share_prefix=True)
    auto = [mb for p in plan_epoch(idx, BatchOptions(**common, packing=None), 0) for mb in p.micro_batches]
    packed = [mb for p in plan_epoch(idx, BatchOptions(**common, packing=True), 0) for mb in p.micro_batches]
    assert any(mb.prefix for mb in auto)  # auto chose the shared prefix somewhere: true must differ
    assert not any(mb.prefix for mb in packed)
    opts = BatchOptions(**common, packing=True)

    def one_per_row_by_choice(mb) -> bool:  # several rows of one example, though two would share a row
        sizes = sorted(int(idx.positions[r[0]]) for r in mb.rows)
        return not mb.packed and len(mb.rows) > 1 and sizes[0] + sizes[1] <= opts.max_row

    assert not any(one_per_row_by_choice(mb) for mb in packed)
    assert any(one_per_row_by_choice(mb) for mb in auto)  # auto lays out one example per row where cheaper
    assert any(mb.packed for mb in packed)
    seen = sorted(i for mb in packed for r in mb.rows for i in r)
    assert seen == sorted(i for mb in auto for r in mb.rows for i in r)  # the same examples, once each


def test_coarse_shapes_use_power_of_two_rows_and_targets() -> None:
    data = random_examples(200, lo=20, hi=700, seed=5)
    opts = BatchOptions(batch_size=2, grad_accumulation_steps=4, max_seq_length=1024, coarse_shapes=True)
    idx = index_examples(data, opts.max_seq_length)
    plans = plan_epoch(idx, opts, 0)
    assert sorted(i for p in plans for mb in p.micro_batches for r in mb.rows for i in r) == sorted(
        idx.usable.tolist()
    )
    for p in plans:
        for mb in p.micro_batches:
            R = mb.length
            assert R >= 256 and R & (R - 1) == 0, R
            assert mb.targets >= 64 and mb.targets & (mb.targets - 1) == 0
            assert mb.shape[0] * R <= opts.token_budget
    fine = plan_stats(plan_epoch(idx, BatchOptions(**{**opts.__dict__, "coarse_shapes": False}), 0), idx)
    assert len(plan_stats(plans, idx).shapes) < len(fine.shapes)
    # None follows the device: these tests run on the CPU, where the fine ladder is the default
    assert BatchOptions(batch_size=1, coarse_shapes=None).coarse is (
        mx.default_device().type == mx.DeviceType.gpu
    )


def test_a_long_example_gets_its_own_micro_batch() -> None:
    # one 1,500-token example among seven of ~100: packing all eight into 1,536-token rows would make the
    # short ones attend over (and pad to) the long row; the planner gives the long one its own rows instead.
    lengths = [1500, 90, 95, 100, 105, 110, 98, 102]
    toks = [np.arange(3, 3 + n) % 500 + 3 for n in lengths]
    data = ArrayExamples(toks)
    opts = BatchOptions(
        batch_size=2,
        grad_accumulation_steps=4,
        max_seq_length=2048,
        shuffle=False,
        attention_cost=3e-4,
        compile_penalty=0.0,
    )
    idx = index_examples(data, opts.max_seq_length)
    (step,) = plan_epoch(idx, opts, 0)
    assert len(step.micro_batches) == 2
    long_mb = next(mb for mb in step.micro_batches if any(0 in r for r in mb.rows))
    short_mb = next(mb for mb in step.micro_batches if mb is not long_mb)
    assert long_mb.rows == ((0,),) and short_mb.length < 512


@pytest.mark.parametrize("coarse", [True, False])
def test_a_micro_batch_holds_no_more_than_batch_size_of_the_longest_example(coarse: bool) -> None:
    # The GPU bench's shape: max_seq_length 4,096 but the longest example 3,169 positions. Packing into
    # 2 x 4,096-position micro-batches would take more memory than a trainer padding 2 examples to 3,169.
    rng = np.random.default_rng(3)
    lengths = [3170, *rng.integers(200, 1500, size=63).tolist()]
    data = ArrayExamples([np.arange(n) % 500 + 3 for n in lengths])
    opts = BatchOptions(batch_size=2, grad_accumulation_steps=4, max_seq_length=4096, coarse_shapes=coarse)
    idx = index_examples(data, opts.max_seq_length)
    plans = plan_epoch(idx, opts, 0) + plan_eval(idx, opts)
    for mb in (mb for p in plans for mb in p.micro_batches):
        rows, R = mb.shape
        # 2 x 3,169 positions, or 2 rows up to 3,328 (3,169 on the 1/8 ladder: plain rows are not split for
        # their padding)
        assert rows * R <= 2 * 3169 or (rows <= 2 and R <= bucket(3169)), mb.shape
    largest = max(len(mb.rows) * mb.length for p in plans for mb in p.micro_batches)
    assert largest <= 2 * bucket(3169) < 2 * opts.max_row
    if coarse:  # power-of-two rows: at most 3 x 2,048
        assert largest <= 2 * 3169
    # without the split's longest known, the old bound (batch_size x max_seq_length) still holds
    assert BatchOptions(batch_size=2, max_seq_length=4096, coarse_shapes=coarse).token_budget == 2 * (
        4096 if coarse else bucket(4096)
    )
