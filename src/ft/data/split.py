"""Train/validation/test split: stratified by label (and optionally a metadata value), and prompt-disjoint.

Records that share a prompt (everything before the last assistant turn) form a group and always
land in the same split, so validation never scores the model on a prompt it trained on. Within
those constraints the split hits ``round(fraction * n)`` records of each label, so the label ratio
of every split matches the whole to within one record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VAL: "val", TEST: "test"}


def _targets(counts: dict[int, int], frac: float) -> dict[int, int]:
    """Records per stratum: ``round(frac * total)`` in all, each stratum floor or ceil of its share."""
    exact = {k: frac * n for k, n in counts.items()}
    out = {k: int(math.floor(v)) for k, v in exact.items()}
    extra = int(round(frac * sum(counts.values()))) - sum(out.values())
    for k in sorted(exact, key=lambda k: (out[k] - exact[k], k))[: max(0, extra)]:
        out[k] += 1
    return out


def strata(labels: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """Strata for :func:`assign_splits`: the label, or the (label, metadata value code) pair."""
    if values is None:
        return labels
    _, codes = np.unique(
        np.stack([labels.astype(np.int64), values.astype(np.int64)]), axis=1, return_inverse=True
    )
    return codes.reshape(-1).astype(np.int64)


def assign_splits(
    labels: np.ndarray, groups: np.ndarray, val: float, test: float = 0.0, seed: int = 42
) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per record.

    ``labels`` (int, -1 for unlabelled; or any stratum ids, see :func:`strata`) are the strata; ``groups`` (int) ties records that must
    stay together. Groups are visited in a seeded random order and placed in test, then val,
    while they fit that split's per-label quota; the rest is train.
    """
    n = len(labels)
    out = np.zeros(n, dtype=np.int8)
    if n == 0 or (val <= 0 and test <= 0):
        return out
    uniq, counts = np.unique(labels, return_counts=True)
    per_label = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
    want = {VAL: _targets(per_label, val), TEST: _targets(per_label, test)}
    for split, frac in ((VAL, val), (TEST, test)):
        # A requested split gets at least one record when there is more than one record.
        if frac > 0 and n >= 2 and sum(want[split].values()) == 0:
            biggest = max(per_label, key=lambda k: per_label[k])
            want[split][biggest] = 1
    # Keep at least one training record per label that has any.
    for lab, total in per_label.items():
        while want[VAL][lab] + want[TEST][lab] >= total and want[VAL][lab] + want[TEST][lab] > 0 and n >= 2:
            key = TEST if want[TEST][lab] > 0 else VAL
            want[key][lab] -= 1
    left = {s: dict(w) for s, w in want.items()}

    rng = np.random.default_rng(seed)
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    single = sizes[inverse] == 1
    # Records sharing a prompt first, a whole group at a time, in seeded random order.
    members: dict[int, list[int]] = {}
    for i, g in zip(np.flatnonzero(~single).tolist(), inverse[~single].tolist(), strict=True):
        members.setdefault(g, []).append(i)
    keys = list(members)  # first-appearance order: deterministic for a given input
    lab = labels.tolist()
    for k in rng.permutation(len(keys)).tolist():
        idx = members[keys[k]]
        need: dict[int, int] = {}
        for i in idx:
            need[lab[i]] = need.get(lab[i], 0) + 1
        for split in (TEST, VAL):
            room = left[split]
            if all(room.get(la, 0) >= c for la, c in need.items()):
                for la, c in need.items():
                    room[la] -= c
                out[idx] = split
                break
    # Then the (usually many) records with a prompt of their own fill what is left of each quota exactly.
    for la in per_label:
        perm = rng.permutation(np.flatnonzero(single & (labels == la)))
        n_test = min(left[TEST].get(la, 0), len(perm))
        n_val = min(left[VAL].get(la, 0), len(perm) - n_test)
        out[perm[:n_test]] = TEST
        out[perm[n_test : n_test + n_val]] = VAL
    return out


def shared_prompts(prompt_keys: Sequence[bytes], assignment: np.ndarray) -> int:
    """Number of distinct prompts that occur in more than one split (0 means no contamination)."""
    seen: dict[bytes, int] = {}
    shared: set[bytes] = set()
    for key, split in zip(prompt_keys, assignment.tolist(), strict=True):
        prev = seen.setdefault(key, split)
        if prev != split:
            shared.add(key)
    return len(shared)
