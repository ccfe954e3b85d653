"""Preference objectives in a run (KTO, DPO, ORPO): their data, class weights, reference and --init-from.

* Data: KTO trains on a ``--labels keep`` dataset (each reply with its label); DPO and ORPO on paired
  records, which preparation stores as two neighbouring rows with one record id, chosen (label 1) then
  rejected (label 0) (:func:`ft.data.prepare.pair_sides`).
* KTO's class weights: unless set, the KTO paper's rule ``w_D n_D / (w_U n_U) in [1, 4/3]`` on the
  training split's counts (:func:`ft.engine.objectives.kto_class_weights`); the plan says which.
* Reference: ``adapters_off`` for adapters trained from the base; ``cached`` for full fine-tuning and for
  a run started from another run's checkpoint (the reference is then the starting model, as in the KTO
  and DPO papers). The cache is computed once, stored as ``runs/<id>/reference.npz`` with its key
  (dataset name/version, model fingerprint, starting checkpoint, objective, sequence length, seed) and
  reused by ``--resume`` only when the key matches, so a resumed run sees the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ft.config.train import TrainConfig
from ft.engine.lora import AdapterSpec
from ft.engine.objectives import PreferenceOptions, kto_class_weights, kto_weight_ratio
from ft.engine.preference import PreferenceData
from ft.errors import ErrorCode, FtError
from ft.workspace import Workspace
from ft.workspace.atomic import atomic_write_bytes

REFERENCE_FILE = "reference.npz"


@dataclass
class PreferenceSetup:
    options: PreferenceOptions
    reference: str  # adapters_off | cached | none
    train: PreferenceData
    val: PreferenceData | None
    notes: list[str] = field(default_factory=list)


def paired_rows(record_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n_pairs, 2) row indices: neighbouring rows of one record id labelled 1 then 0 (one side dropped
    at preparation, e.g. too long, leaves its partner unpaired: it is not used)."""
    rid = np.asarray(record_ids)
    lab = np.asarray(labels)
    if len(rid) < 2:
        return np.zeros((0, 2), np.int64)
    i = np.flatnonzero((rid[:-1] == rid[1:]) & (lab[:-1] == 1) & (lab[1:] == 0))
    return np.stack([i, i + 1], axis=1).astype(np.int64)


def preference_data(split: Any, objective: str, what: str) -> PreferenceData:
    labels = np.asarray(split.labels, dtype=np.int8)
    if objective == "kto":
        if len(labels) and (labels < 0).all():
            raise FtError(
                ErrorCode.DATA_INVALID,
                f"KTO needs labelled replies, but the {what} split has no labels",
                "prepare the data with --labels keep (data.labels: keep) from records that carry a label",
            )
        if (labels < 0).any():
            raise FtError(
                ErrorCode.DATA_INVALID,
                f"KTO: {int((labels < 0).sum())} replies of the {what} split have no label",
                "label every record (label: true/false), or train them with objective sft",
            )
        return PreferenceData(split, labels)
    pairs = paired_rows(split.record_ids, labels)
    if not len(pairs):
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"{objective.upper()} needs paired records, but the {what} split has none",
            'prepare a file of {"prompt", "chosen", "rejected"} records with --labels keep '
            "(ft init writes data/pairs.jsonl)",
        )
    return PreferenceData(split, labels, pairs)


def setup_preference(
    cfg: TrainConfig, train_split: Any, val_split: Any | None, *, init_from: str | None = None
) -> PreferenceSetup:
    t, p = cfg.training, cfg.preference
    objective = t.objective
    train = preference_data(train_split, objective, "train")
    val = preference_data(val_split, objective, "val") if val_split is not None and len(val_split) else None
    notes: list[str] = []
    wd, wu = p.desirable_weight, p.undesirable_weight
    if objective == "kto":
        n_d = int((train.labels == 1).sum())
        n_u = int((train.labels == 0).sum())
        if wd is None and wu is None:
            wd, wu = kto_class_weights(n_d, n_u)
            how = "the KTO paper's class-balance rule"
        else:
            wd, wu = wd or 1.0, wu or 1.0
            how = "set in the preference section"
        ratio = kto_weight_ratio(wd, wu, n_d, n_u)
        notes.append(
            f"KTO class weights ({how}): desirable {wd:.4g}, undesirable {wu:.4g} for {n_d} desirable and "
            f"{n_u} undesirable replies; w_D n_D / (w_U n_U) = {ratio:.3g}"
            + (
                " (the paper recommends 1 to 4/3)"
                if ratio is not None and not 1 - 1e-9 <= ratio <= 4 / 3 + 1e-9
                else ""
            )
        )
        if not n_d or not n_u:
            notes.append("KTO: the train split has only one class of replies")
    opts = PreferenceOptions(
        objective,  # type: ignore[arg-type]
        beta=p.beta,
        loss_type=p.loss_type,
        label_smoothing=p.label_smoothing,
        desirable_weight=float(wd or 1.0),
        undesirable_weight=float(wu or 1.0),
        orpo_lambda=p.orpo_lambda,
    )
    if not opts.needs_reference:
        reference = "none"
    elif p.reference != "auto":
        reference = p.reference
    else:
        reference = "cached" if (t.method == "full" or init_from) else "adapters_off"
    if reference == "adapters_off" and t.method == "full":
        raise FtError(
            ErrorCode.CONFIG_INVALID,
            "preference.reference adapters_off needs adapters, but training.method is full",
            "use preference.reference: cached (or auto)",
        )
    if reference != "none":
        why = {
            "adapters_off": "the base model, by switching the adapters off (no second copy in memory)",
            "cached": "log-probabilities of the starting model, computed once before training",
        }[reference]
        notes.append(f"{objective.upper()} reference: {why}")
    return PreferenceSetup(opts, reference, train, val, notes)


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def load_or_compute_reference(
    run_dir: Path, key: str, compute: Any, write: bool = True
) -> tuple[tuple[np.ndarray, np.ndarray | None], bool]:
    """The cached reference of a run: loaded when ``runs/<id>/reference.npz`` has this key, else computed
    by ``compute()`` -> (train, val) and written atomically (unless ``write`` is off: a data-parallel rank
    other than 0 computes the same numbers itself). Returns ((train, val), loaded)."""
    path = Path(run_dir) / REFERENCE_FILE
    if path.is_file():
        try:
            with np.load(path) as z:
                if str(z["key"]) == key:
                    val = z["val"] if z["has_val"] else None
                    return (z["train"].copy(), None if val is None else val.copy()), True
        except (OSError, ValueError, KeyError):
            pass  # damaged or from other settings: computed again
    train, val = compute()
    if not write:
        return (train, val), False
    import io

    buf = io.BytesIO()
    np.savez(
        buf,
        key=np.array(key),
        train=train,
        val=val if val is not None else np.zeros(0),
        has_val=np.array(val is not None),
    )
    atomic_write_bytes(path, buf.getvalue())
    return (train, val), False


def init_from_checkpoint(ws: Workspace, model: Any, spec: AdapterSpec, run: str) -> str:
    """Load RUN's best (else latest) checkpoint into ``model``, whose adapters must match; returns its path."""
    from ft.services.checkpoints import load_checkpoint_weights, resolve_checkpoint

    ckpt = resolve_checkpoint(ws, run, "best")
    theirs = ckpt.spec()

    def norm(v: Any) -> Any:
        return v if isinstance(v, str | int) else tuple(v)

    diffs = [
        f"{k} {norm(getattr(theirs, k))!r} vs {norm(getattr(spec, k))!r}"
        for k in ("method", "rank", "target_modules", "layers")
        if norm(getattr(theirs, k)) != norm(getattr(spec, k))
    ]
    if diffs:
        raise FtError(
            ErrorCode.CONFIG_INVALID,
            f"--init-from {run}: its checkpoint's adapters differ from this run's: " + "; ".join(diffs),
            "use the same training.method and lora settings as that run (`ft config show` / its config.json)",
        )
    was = model.training
    load_checkpoint_weights(model, ckpt)
    model.train(was)
    return ckpt.path
