"""ft.services.preference: pairs from stored rows, KTO class weights in the plan, evaluation rewards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ft.config.train import TrainConfig
from ft.engine.batching import ArrayExamples
from ft.errors import FtError
from ft.services.eval_preference import preference_report
from ft.services.preference import paired_rows, setup_preference


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


def test_evaluation_per_group_matches_the_groups_alone() -> None:
    """Per group: the same figures as a report of that group's rows alone; one-label groups have no margin."""
    labels = np.array([1, 0, 1, 0, 1, 1])
    rid = np.array([1, 1, 2, 2, 3, 4])
    base = np.array([10.0, 10.0, 8.0, 9.0, 5.0, 6.0])
    tuned = np.array([9.0, 12.0, 8.5, 8.0, 4.0, 6.5])
    groups = ["a", "a", "b", "b", None, None]
    rep = preference_report(labels, rid, np.arange(6), base, tuned, beta=0.5, groups=("topic", groups))
    assert rep is not None and rep.group_by == "topic"
    by = {g.group: g for g in rep.by_group}
    assert sorted(by) == ["(none)", "a", "b"]
    for name, rows in (("a", [0, 1]), ("b", [2, 3])):
        alone = preference_report(labels[rows], rid[rows], np.arange(2), base[rows], tuned[rows], beta=0.5)
        assert alone is not None
        g = by[name]
        assert (
            (g.replies, g.pairs, g.reward_accuracy)
            == (2, alone.pairs, alone.reward_accuracy)
            == (2, 1, g.reward_accuracy)
        )
        assert g.margin == pytest.approx(alone.margin)
        assert [(x.label, x.mean_logp_change) for x in g.by_label] == [
            (x.label, pytest.approx(x.mean_logp_change)) for x in alone.by_label
        ]
    assert by["a"].reward_accuracy == 1.0 and by["b"].reward_accuracy == 0.0
    # Records without the field: two desirable replies, no pair: sign accuracy, no margin.
    none = by["(none)"]
    assert none.pairs == 0 and none.margin is None and none.reward_accuracy == 0.5
    assert [x.label for x in none.by_label] == ["desirable"]
    assert none.by_label[0].mean_logp_change == pytest.approx((1.0 - 0.5) / 2)
    # Only scored rows count: row 5 not scored.
    rep = preference_report(
        labels, rid, np.arange(5), base[:5], tuned[:5], beta=0.5, groups=("topic", groups)
    )
    assert rep is not None and {g.group: g.replies for g in rep.by_group} == {"(none)": 1, "a": 2, "b": 2}


def test_sft_then_kto_from_it_then_resume_with_the_cached_reference(tmp_path) -> None:
    """On the tiny model: SFT, KTO --init-from it (cached reference written), a resume that reuses the cache
    and ends with the same weights as an uninterrupted run; DPO on the pairs file."""
    from ft.engine.callbacks import read_metrics
    from ft.services.dataset_prepare import prepare_dataset
    from ft.services.training import run_training
    from test_resume_support import MODEL, make_workspace, settings

    ws = make_workspace(tmp_path / "ws")
    prepare_dataset(ws, "data/sample.jsonl", name="kto", model=MODEL, data={"labels": "keep"})
    sft = run_training(ws, settings(steps=2, save=2), dataset="sample", name="sft")
    kto_set = [*settings(steps=4, save=2, evals=2), "training.objective=kto", "data.labels=keep"]
    full = run_training(ws, kto_set, dataset="kto", name="kto-full", init_from=sft.run_id)
    assert full.status == "completed" and full.plan.objective == "kto"
    run_dir = tmp_path / "ws" / "runs" / full.run_id
    assert (run_dir / "reference.npz").is_file()
    rows = read_metrics(run_dir / "metrics.jsonl")
    first_eval = next(r for r in rows if r["type"] == "eval")
    assert first_eval["metrics"]["rewards_chosen"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert {"kl", "margin", "reward_accuracy"} <= set(
        next(r for r in rows if r["type"] == "train")["metrics"]
    )
    # Resumed from its step-2 checkpoint: the cached reference is reused and steps 3-4 are replayed exactly.
    import mlx.core as mx

    ckpts = run_dir / "checkpoints"
    before = {k: np.array(v) for k, v in mx.load(str(ckpts / "step-000004" / "adapters.safetensors")).items()}
    resumed = run_training(ws, [], resume=str(ckpts / "step-000002"))
    assert resumed.steps == 4 and resumed.run_id == full.run_id
    assert "loaded from reference.npz" in (run_dir / "train.log").read_text()
    after = mx.load(str(ckpts / "step-000004" / "adapters.safetensors"))
    assert max(float(np.max(np.abs(np.array(after[k]) - before[k]))) for k in before) <= 1e-6
    # DPO on ft init's pairs file.
    prepare_dataset(ws, "data/pairs.jsonl", name="pairs", model=MODEL, data={"labels": "keep"})
    dpo = run_training(
        ws, [*settings(steps=2), "training.objective=dpo", "data.labels=keep"], dataset="pairs"
    )
    assert dpo.status == "completed" and dpo.first_val_loss == pytest.approx(np.log(2), abs=1e-4)


def test_evaluate_a_kto_run_per_label_and_per_group(tmp_path) -> None:
    """A real KTO run on the tiny model over a dataset prepared with --group-by: `ft evaluate`'s preference
    report per group (service result, JSON and markdown report) adds up to the per-label one."""
    import json

    from ft.services.dataset_prepare import prepare_dataset
    from ft.services.evaluation import evaluate
    from ft.services.training import run_training
    from test_resume_support import MODEL, make_workspace, settings

    ws = make_workspace(tmp_path / "ws")
    src = (tmp_path / "ws" / "data" / "sample.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in src[:120]]
    for k, r in enumerate(recs):
        if k % 7:  # one record in seven has no group: reported as "(none)"
            r["topic"] = "even" if k % 2 == 0 else "odd"
    (tmp_path / "ws" / "grouped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = prepare_dataset(
        ws, "grouped.jsonl", name="grouped", model=MODEL, data={"labels": "keep", "group_by": "topic"}
    )
    kto = run_training(
        ws,
        [*settings(steps=3, save=3, evals=3), "training.objective=kto", "data.labels=keep"],
        dataset=ds.name,
    )
    assert kto.status == "completed"
    r = evaluate(ws, run=kto.run_id, checkpoint="latest", n_samples=0, tool_cases=0, batch_size=4)
    p = r.preference
    assert p is not None and p.group_by == "topic" and p.beta == pytest.approx(0.1)
    by = {g.group: g for g in p.by_group}
    assert set(by) == {"even", "odd", "(none)"}
    assert sum(g.replies for g in by.values()) == r.records
    for lab in p.by_label:  # each label's replies and mean change are the groups' weighted together
        parts = [x for g in by.values() for x in g.by_label if x.label == lab.label]
        assert sum(x.replies for x in parts) == lab.replies
        assert sum(x.mean_logp_change * x.replies for x in parts) / lab.replies == pytest.approx(
            lab.mean_logp_change, abs=1e-9
        )
    assert any(lab.mean_logp_change != 0.0 for lab in p.by_label)  # the run moved the model
    saved = json.loads(Path(r.report_json).read_text())["preference"]
    assert [g["group"] for g in saved["by_group"]] == [g.group for g in p.by_group]
    md = Path(r.report_md).read_text()
    assert "Per `topic`:" in md and "| even |" in md and "| (none) |" in md
