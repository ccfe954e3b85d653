"""ft.services.preference: pairs from stored rows, KTO class weights in the plan, evaluation rewards."""

from __future__ import annotations

import numpy as np
import pytest

from ft.config.train import TrainConfig
from ft.engine.batching import ArrayExamples
from ft.errors import FtError
from ft.services.preference import paired_rows, preference_report, setup_preference


class _Split(ArrayExamples):
    def __init__(self, n: int, labels, record_ids) -> None:
        super().__init__([[1, 2, 3, 4]] * n, [[False, False, True, True]] * n, record_ids)
        self.labels = np.asarray(labels, np.int8)


def test_pairs_are_neighbouring_rows_of_one_record_chosen_first() -> None:
    rid = np.array([5, 5, 7, 8, 8, 9, 9])
    lab = np.array([1, 0, 1, 1, 0, 0, 1])  # 7 lost its rejected side; 9 is in the wrong order
    assert paired_rows(rid, lab).tolist() == [[0, 1], [3, 4]]


def test_kto_weights_follow_the_class_balance_rule_and_the_plan_says_so() -> None:
    cfg = TrainConfig.model_validate({"training": {"objective": "kto"}, "data": {"labels": "keep"}})
    split = _Split(8, [1, 1, 1, 1, 1, 1, 0, 0], range(8))
    ps = setup_preference(cfg, split, None)
    assert ps.options.undesirable_weight == 1.0
    assert ps.options.desirable_weight * 6 / 2 == pytest.approx(4 / 3)
    assert any("class-balance rule" in n and "= 1.33" in n for n in ps.notes)
    assert ps.reference == "adapters_off"
    assert setup_preference(cfg, split, None, init_from="runs/x/step-1").reference == "cached"


def test_dpo_without_pairs_and_kto_without_labels_are_clear_errors() -> None:
    cfg = TrainConfig.model_validate({"training": {"objective": "dpo"}, "data": {"labels": "keep"}})
    with pytest.raises(FtError, match="paired records"):
        setup_preference(cfg, _Split(4, [1, 1, 0, 0], range(4)), None)
    cfg = TrainConfig.model_validate({"training": {"objective": "kto"}, "data": {"labels": "keep"}})
    with pytest.raises(FtError, match="no labels"):
        setup_preference(cfg, _Split(4, [-1] * 4, range(4)), None)


def test_evaluation_rewards_margin_and_accuracy() -> None:
    labels = np.array([1, 0, 1, 0])
    rid = np.array([1, 1, 2, 2])
    base = np.array([10.0, 10.0, 8.0, 9.0])
    tuned = np.array([9.0, 12.0, 8.5, 8.0])  # pair 1: right way; pair 2: wrong way
    rep = preference_report(labels, rid, np.arange(4), base, tuned, beta=0.5)
    assert rep is not None and rep.pairs == 2
    assert rep.reward_accuracy == 0.5
    # rewards 0.5 * (base - tuned): chosen (0.5, -0.25), rejected (-1.0, 0.5); margins 1.5 and -0.75
    assert rep.margin == pytest.approx((1.5 - 0.75) / 2)
    d = {r.label: r for r in rep.by_label}
    assert d["desirable"].mean_logp_change == pytest.approx((1.0 - 0.5) / 2)
    assert d["undesirable"].mean_logp_change == pytest.approx((-2.0 + 1.0) / 2)
    # Labelled replies (no pairs): sign accuracy and a difference of means.
    rep = preference_report(labels, np.arange(4), np.arange(4), base, tuned, beta=1.0)
    assert rep is not None and rep.pairs == 0
    assert rep.reward_accuracy == pytest.approx(np.mean([True, True, False, False]))
    assert preference_report(np.array([1, 1]), np.arange(2), np.arange(2), base[:2], tuned[:2], 1.0) is None
