"""The split on its own: exact per-label quotas, whole prompt groups, determinism by seed."""

from __future__ import annotations

import numpy as np

from ft.data.split import TEST, TRAIN, VAL, assign_splits, shared_prompts


def test_mixed_singletons_and_groups():
    rng = np.random.default_rng(0)
    n = 2000
    labels = rng.choice([1, 0, -1], size=n, p=[0.6, 0.3, 0.1]).astype(np.int8)
    groups = np.arange(n)
    groups[:300] = np.repeat(np.arange(100), 3)  # 100 prompts answered three times
    out = assign_splits(labels, groups, val=0.2, test=0.1, seed=5)
    for la in (1, 0, -1):
        n_l = int((labels == la).sum())
        for split, frac in ((VAL, 0.2), (TEST, 0.1)):
            assert abs(int(((out == split) & (labels == la)).sum()) - round(frac * n_l)) <= 1
    keys = [int(g).to_bytes(8, "little") for g in groups]
    assert shared_prompts(keys, out) == 0
    assert (out == TRAIN).sum() > 0
    assert np.array_equal(out, assign_splits(labels, groups, 0.2, 0.1, seed=5))
    assert not np.array_equal(out, assign_splits(labels, groups, 0.2, 0.1, seed=6))


def test_tiny_inputs_keep_training_data():
    assert assign_splits(np.array([1], np.int8), np.array([0]), 0.2).tolist() == [TRAIN]
    two = assign_splits(np.array([1, 1], np.int8), np.array([0, 1]), 0.2)
    assert sorted(two.tolist()) == [TRAIN, VAL]
    assert assign_splits(np.array([1, 0, 1], np.int8), np.array([0, 1, 2]), 0.0).tolist() == [TRAIN] * 3
