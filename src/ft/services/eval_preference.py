"""`ft evaluate`'s preference section: implicit rewards of the tuned model against the base (beta x the
log-likelihood change of each reply), reward accuracy and margin over pairs, per label and per group."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ft.services import tool_evaluation
from ft.services.preference import paired_rows
from ft.services.run_record import RunSnapshot


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# ----------------------------------------------------------------------------------------- evaluate
class ReplyLikelihood(BaseModel):
    label: str
    replies: int
    mean_logp_change: float = Field(
        description="mean over replies of log p(reply | prompt), tuned - base (nats)"
    )
    mean_reward: float = Field(description="beta x the mean log-likelihood change")


class PreferenceGroup(BaseModel):
    """The preference figures of the replies of one group (a value of the dataset's ``--group-by`` field)."""

    group: str = Field(description="the value of the group field ('(none)': records without it)")
    replies: int
    pairs: int = Field(description="chosen/rejected pairs scored in this group (0 for labelled replies)")
    reward_accuracy: float = Field(
        description="pairs: chosen reward above rejected; labelled replies: reward with the label's sign"
    )
    margin: float | None = Field(
        description="mean chosen (desirable) reward minus mean rejected (undesirable) reward; "
        "null when the group has replies of one label only"
    )
    by_label: list[ReplyLikelihood] = Field(default_factory=list)


class PreferenceReport(BaseModel):
    """Implicit rewards of the tuned model against the base: ``beta (log p_tuned - log p_base)`` per reply."""

    beta: float
    pairs: int = Field(description="chosen/rejected pairs scored (0 for labelled replies)")
    reward_accuracy: float = Field(
        description="pairs: chosen reward above rejected; labelled replies: reward with the label's sign"
    )
    margin: float = Field(
        description="mean chosen (desirable) reward minus mean rejected (undesirable) reward"
    )
    by_label: list[ReplyLikelihood] = Field(default_factory=list)
    group_by: str | None = Field(default=None, description="the record field of by_group")
    by_group: list[PreferenceGroup] = Field(default_factory=list)


def _summary(
    delta: np.ndarray, beta: float, lab: np.ndarray, pairs: np.ndarray, sel: np.ndarray
) -> tuple[int, float, float | None, list[ReplyLikelihood]]:
    """(pairs, reward accuracy, margin, per-label likelihoods) of the scored replies in ``sel``.

    ``delta``: log-likelihood change per row (NaN: not scored); ``pairs``: (chosen, rejected) rows of the
    whole split (those with both sides in ``sel`` count)."""
    reward = beta * delta
    pos, neg = sel & (lab == 1), sel & (lab == 0)
    pairs = pairs[sel[pairs[:, 0]] & sel[pairs[:, 1]]] if len(pairs) else pairs
    margin: float | None
    if len(pairs):
        rc, rr = reward[pairs[:, 0]], reward[pairs[:, 1]]
        acc, margin = float(np.mean(rc > rr)), float(np.mean(rc - rr))
    else:
        acc = float(np.mean(np.concatenate([reward[pos] > 0, reward[neg] < 0])))
        margin = float(reward[pos].mean() - reward[neg].mean()) if pos.any() and neg.any() else None
    by_label = [
        ReplyLikelihood(
            label=name,
            replies=int(s.sum()),
            mean_logp_change=float(delta[s].mean()),
            mean_reward=float(reward[s].mean()),
        )
        for name, s in (("desirable", pos), ("undesirable", neg))
        if s.any()
    ]
    return len(pairs), acc, margin, by_label


def preference_report(
    labels: np.ndarray,
    record_ids: np.ndarray,
    index: np.ndarray,
    base_loss_sum: np.ndarray,
    tuned_loss_sum: np.ndarray,
    beta: float,
    groups: tuple[str, list[str | None]] | None = None,
) -> PreferenceReport | None:
    """Rewards, margin and accuracy from per-reply summed losses of base and tuned (``index``: scored rows).

    ``groups``: (field, its value per row of the split): the same figures per value ("(none)" for rows
    without it). None when the split has not both desirable and undesirable replies."""
    lab_all = np.asarray(labels)
    delta = np.full(len(lab_all), np.nan)
    delta[np.asarray(index)] = -(np.asarray(tuned_loss_sum) - np.asarray(base_loss_sum))
    scored = ~np.isnan(delta)
    if not (scored & (lab_all == 1)).any() or not (scored & (lab_all == 0)).any():
        return None
    pairs = paired_rows(record_ids, lab_all)
    n_pairs, acc, margin, by_label = _summary(delta, beta, lab_all, pairs, scored)
    assert margin is not None  # both labels are present
    by_group = []
    if groups is not None:
        values = np.array(["(none)" if g is None else g for g in groups[1]], dtype=object)
        for g in sorted(set(values[scored].tolist())):
            sel = scored & (values == g)
            n, a, m, bl = _summary(delta, beta, lab_all, pairs, sel)
            by_group.append(
                PreferenceGroup(
                    group=g, replies=int(sel.sum()), pairs=n, reward_accuracy=a, margin=m, by_label=bl
                )
            )
    return PreferenceReport(
        beta=beta,
        pairs=n_pairs,
        reward_accuracy=acc,
        margin=margin,
        by_label=by_label,
        group_by=groups[0] if groups is not None else None,
        by_group=by_group,
    )


def _manifest_group(manifest: dict[str, Any]) -> str | None:
    """The ``--group-by`` field the dataset was prepared with (None: none)."""
    value = (manifest.get("options") or {}).get("group_by")
    return value if isinstance(value, str) and value else None


def preference_groups(
    data: Any, folder: Path, split: str, group_by: str | None, manifest: dict[str, Any], compare_base: bool
) -> tuple[str, list[str | None]] | None:
    """(field, value per row) for the preference report per group: this ``--group-by``, else the one the
    dataset was prepared with. None without either, without the base to compare with, or on a split
    without both labels (no preference report)."""
    labels = np.asarray(data.labels)
    field = group_by or _manifest_group(manifest)
    if not field or not compare_base or not ((labels == 1).any() and (labels == 0).any()):
        return None
    if group_by:
        return field, tool_evaluation.split_groups(folder, split, field)
    from ft.data.store import group_values

    values = group_values(folder, split, field)
    return (field, values) if any(v is not None for v in values) else None


def run_preference_report(
    snap: RunSnapshot | None,
    data: Any,
    base_scores: Any,
    tuned_scores: Any,
    groups: tuple[str, list[str | None]] | None = None,
) -> Any:
    """Implicit rewards against the base (with the run's beta for a preference objective, else 1)."""
    if base_scores is None:
        return None
    cfg = snap.config if snap is not None else None
    beta = cfg.preference.beta if cfg is not None and cfg.training.objective != "sft" else 1.0
    return preference_report(
        data.labels,
        data.record_ids,
        tuned_scores.index,
        base_scores.loss_sum,
        tuned_scores.loss_sum,
        beta,
        groups=groups,
    )
