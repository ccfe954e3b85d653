"""Preference objectives: KTO, DPO (sigmoid, IPO, label smoothing) and ORPO, as published.

Every objective works on sequence log-probabilities: ``logp(y | x)``, the sum over the reply's trained
tokens of ``log p(token | everything before it)`` (ORPO and IPO use the per-token mean, as TRL does).
``pi`` is the model being trained, ``ref`` the reference (the base with the adapters switched off, or
log-probabilities computed once at the start; :mod:`ft.engine.preference`). ``beta`` everywhere.

* **DPO** (Rafailov et al. 2023, eq. 7), per pair: ``h = (pi_c - pi_r) - (ref_c - ref_r)``;
  ``sigmoid``: ``-(1 - eps) log s(beta h) - eps log s(-beta h)`` (``eps`` = label smoothing, the
  conservative DPO of Mitchell 2023); ``ipo`` (Azar et al. 2023, eq. 17 with tau = beta):
  ``(h - 1 / (2 beta))^2`` on mean log-probabilities. Rewards: ``beta (pi - ref)`` of each side.
* **KTO** (Ethayarajh et al. 2024, eq. 8), per reply: ``r = pi - ref``; ``z0 = max(0, mean over
  mismatched (prompt, other reply) pairs of pi - ref)``, a batch estimate of KL(pi || ref) that is not
  back-propagated; desirable: ``w_D (1 - s(beta (r - z0)))``, undesirable: ``w_U (1 - s(beta (z0 - r)))``.
  Rewards ``beta r``. The class weights' default follows the paper's rule
  ``w_D n_D / (w_U n_U) in [1, 4/3]`` (:func:`kto_class_weights`).
* **ORPO** (Hong et al. 2024, eq. 6-7), per pair on mean log-probabilities:
  ``log odds(y) = logp - log(1 - exp(logp))``; loss = NLL of the chosen reply (token mean) ``- lambda
  mean log s(log odds(chosen) - log odds(rejected))``. No reference. Rewards ``lambda logp``.

Losses are means over the units of an optimizer step (pairs, or replies for KTO; the NLL of ORPO over the
chosen tokens of the step): a micro-batch's loss is its sum divided by the whole step's count, so the
gradients of accumulated micro-batches add up to the gradient of one big batch. KTO's ``z0`` is estimated
over the whole step before any gradient is taken (:mod:`ft.engine.preference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import mlx.nn as nn

ObjectiveName = Literal["sft", "kto", "dpo", "orpo"]
LossType = Literal["sigmoid", "ipo"]
PREFERENCE_OBJECTIVES = ("kto", "dpo", "orpo")

# Aux sums a preference micro-batch returns (summed over micro-batches, divided at the end): see metrics().
AUX = (
    "loss",  # sum of unit losses (ORPO: the odds-ratio term only)
    "units",  # pairs (DPO/ORPO) or replies (KTO)
    "reward_chosen",  # sum over chosen / desirable replies
    "n_chosen",
    "reward_rejected",  # sum over rejected / undesirable replies
    "n_rejected",
    "correct",  # pairs whose chosen reward beats the rejected one (KTO: replies whose reward has their label's sign)
    "margin",  # sum over pairs of chosen - rejected reward (KTO: unused, the margin is a difference of means)
    "nll",  # ORPO: summed NLL of chosen tokens
    "nll_tokens",
    "logp_chosen",  # summed policy log-probabilities (per the objective's reduction)
    "logp_rejected",
    "kl",  # KTO: z0 of each unit's step, summed over units
)


@dataclass(frozen=True)
class PreferenceOptions:
    objective: Literal["kto", "dpo", "orpo"]
    beta: float = 0.1
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    orpo_lambda: float = 0.1

    @property
    def paired(self) -> bool:
        return self.objective in ("dpo", "orpo")

    @property
    def needs_reference(self) -> bool:
        return self.objective != "orpo"

    @property
    def mean_logps(self) -> bool:
        """Per-token mean log-probabilities (ORPO, IPO) instead of sums."""
        return self.objective == "orpo" or (self.objective == "dpo" and self.loss_type == "ipo")


def kto_class_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(w_D, w_U) for KTO by the paper's rule ``w_D n_D / (w_U n_U) in [1, 4/3]``.

    w_U = 1 and w_D is the value closest to 1 that keeps the ratio in range: 1 when the classes already
    are within it; ``(4/3) n_U / n_D`` when desirable replies dominate (3:1 gives 4/9, ratio 4/3);
    ``n_U / n_D`` when they are rare (1:10 gives 10, ratio 1). One class missing: (1, 1).
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        return 1.0, 1.0
    lo = n_undesirable / n_desirable
    hi = 4.0 / 3.0 * n_undesirable / n_desirable
    return float(min(max(1.0, lo), hi)), 1.0


def kto_weight_ratio(wd: float, wu: float, n_desirable: int, n_undesirable: int) -> float | None:
    """``w_D n_D / (w_U n_U)``: the paper recommends [1, 4/3]."""
    if n_undesirable <= 0 or wu <= 0:
        return None
    return wd * n_desirable / (wu * n_undesirable)


def dpo_terms(
    pc: mx.array, pr: mx.array, rc: mx.array, rr: mx.array, opts: PreferenceOptions
) -> tuple[mx.array, mx.array, mx.array]:
    """Per pair: (loss, chosen reward, rejected reward)."""
    h = (pc - pr) - (rc - rr)
    b = opts.beta
    if opts.loss_type == "ipo":
        losses = mx.square(h - 1.0 / (2.0 * b))
    else:
        eps = opts.label_smoothing
        losses = -nn.log_sigmoid(b * h) * (1.0 - eps) - nn.log_sigmoid(-b * h) * eps
    return losses, mx.stop_gradient(b * (pc - rc)), mx.stop_gradient(b * (pr - rr))


def kto_kl(policy_kl: mx.array, ref_kl: mx.array, mask: mx.array) -> mx.array:
    """z0 = max(0, mean over the mismatched pairs of pi - ref), never back-propagated."""
    n = mx.maximum(mask.sum(), 1.0)
    return mx.stop_gradient(mx.maximum(((policy_kl - ref_kl) * mask).sum() / n, 0.0))


def kto_terms(
    p: mx.array, r: mx.array, desirable: mx.array, kl: mx.array, opts: PreferenceOptions
) -> tuple[mx.array, mx.array]:
    """Per reply: (weighted loss, reward). ``desirable``: 1.0 / 0.0."""
    b = opts.beta
    ratio = p - r
    loss_d = opts.desirable_weight * (1.0 - mx.sigmoid(b * (ratio - kl)))
    loss_u = opts.undesirable_weight * (1.0 - mx.sigmoid(b * (kl - ratio)))
    losses = desirable * loss_d + (1.0 - desirable) * loss_u
    return losses, mx.stop_gradient(b * ratio)


def orpo_terms(pc: mx.array, pr: mx.array, opts: PreferenceOptions) -> tuple[mx.array, mx.array, mx.array]:
    """Per pair on mean log-probabilities: (odds-ratio loss, chosen reward, rejected reward)."""
    # log(1 - exp(logp)) is -inf at logp = 0 (probability 1): keep it finite.
    pc_, pr_ = mx.minimum(pc, -1e-6), mx.minimum(pr, -1e-6)
    log_odds = (pc_ - pr_) - (mx.log1p(-mx.exp(pc_)) - mx.log1p(-mx.exp(pr_)))
    lam = opts.orpo_lambda
    losses = -lam * nn.log_sigmoid(log_odds)
    return losses, mx.stop_gradient(lam * pc), mx.stop_gradient(lam * pr)


def metrics(sums: dict[str, float], objective: str) -> dict[str, float]:
    """Means from summed aux values: loss, rewards, margin, reward accuracy (+ NLL for ORPO)."""

    def div(a: float, b: float) -> float:
        return a / b if b else float("nan")

    out = {
        "rewards_chosen": div(sums["reward_chosen"], sums["n_chosen"]),
        "rewards_rejected": div(sums["reward_rejected"], sums["n_rejected"]),
        "reward_accuracy": div(sums["correct"], sums["units"]),
        "logps_chosen": div(sums["logp_chosen"], sums["n_chosen"]),
        "logps_rejected": div(sums["logp_rejected"], sums["n_rejected"]),
    }
    if objective == "kto":
        out["margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    else:
        out["margin"] = div(sums["margin"], sums["units"])
    if objective == "kto":
        out["kl"] = div(sums["kl"], sums["units"])
    if objective == "orpo":
        out["nll"] = div(sums["nll"], sums["nll_tokens"])
    return out
