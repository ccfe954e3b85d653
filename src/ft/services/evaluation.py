"""`ft evaluate`: does the tuned model beat its base on held-out data, on what, and by how much.

For one checkpoint of a run and one split of a prepared dataset (by default the run's own dataset,
validation split):

1. Metrics on every record (or ``limit`` of them), for the base model and the tuned model on the same
   records: mean cross-entropy per trained token, perplexity, next-token accuracy on trained tokens;
   split by label when the dataset kept labels (a good tune lowers the loss on desirable replies and,
   relative to the base, raises it on undesirable ones: the *gap* is the second change minus the first).
2. Generations for the first ``n_samples`` records: the conversation up to its last assistant turn is
   the prompt, the trained reply is the reference; tuned and base replies are scored by exact match,
   normalized exact match, token F1 and ROUGE-L (:mod:`ft.data.metrics`), with prompt and generation
   throughput. Generation stops at the tokenizer's EOS ids and the chat template's end-of-turn marker.
3. ``runs/<id>/eval/<checkpoint>-<split>/report.json`` and ``report.md``, and a row in the registry's
   ``evaluations`` table.

One model is loaded: the base is scored first, then the checkpoint is put on it and scored again, so
memory holds one model, per-record sums and one micro-batch at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ft import __version__
from ft.errors import ErrorCode, FtError
from ft.services import tool_evaluation
from ft.services.checkpoints import ResolvedCheckpoint, resolve_checkpoint
from ft.services.eval_preference import preference_groups, run_preference_report
from ft.services.eval_report import (
    REPORT_JSON,
    REPORT_MD,
    TABLE,
    EvalProgress,
    EvaluationResult,
    ModelReport,
    Sampling,
    write_report,
)
from ft.services.eval_scoring import Scorer, compare, load, model_report, reply_decoder, verdict, where
from ft.services.eval_scoring import samples as scored_samples
from ft.services.run_record import RunRecord, RunSnapshot
from ft.workspace import Workspace
from ft.workspace.run_folder import EVAL_DIR

log = logging.getLogger(__name__)

SPLITS = ("val", "test", "train")
DEFAULT_BATCH_SIZE = 8  # records per forward pass when the run does not say what fit while training


class EvalOptions(BaseModel):
    """How `evaluate` scores and generates; the defaults of `evaluate` and `ft evaluate`, and each field's
    docstring its flag's help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    split: str = "val"
    """val | test (or train)."""
    n_samples: int = 8
    """Records to generate replies for (0 = none)."""
    max_tokens: int = 256
    """Most tokens per generated reply."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    seed: int = 0
    """Seed for sampling (and for the --limit subset)."""
    compare_base: bool = True
    """Also evaluate the base model on the same records."""
    batch_size: int | None = None
    """Records per forward pass / replies generated together (default: the run's training.batch_size)."""
    limit: int | None = None
    """Score a fixed seeded subset of this many records."""
    tool_cases: int = 64
    """When replies call tools: assistant turns to generate and score tool calls for (0 = none)."""
    group_by: str | None = None
    """Also report tool-call and preference metrics per value of this record key (default for the preference
    report: the dataset's --group-by)."""


_DEFAULT = EvalOptions()


# ------------------------------------------------------------------------------------ helpers
def _parse_dataset(spec: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@vN`` / ``NAME@N``."""
    from ft.services.datasets import parse_dataset_ref

    return parse_dataset_ref(spec)


def run_info(ws: Workspace, ckpt: ResolvedCheckpoint) -> tuple[RunRecord, RunSnapshot | None]:
    """(the run's registry record, the snapshot this checkpoint was trained with -- None when unreadable)."""
    record = RunRecord.of(ws.registry().get("runs", id=ckpt.run_id) if ckpt.run_id else None)
    return record, ckpt.snapshot


def trained_dataset(record: RunRecord, snap: RunSnapshot | None) -> tuple[str, int | None] | None:
    """The prepared dataset (name, version) a run trained on, from its config snapshot or registry record."""
    if snap is not None and snap.dataset is not None:
        return snap.dataset.name, snap.dataset.version
    if record.dataset:
        return record.dataset, record.dataset_version
    return None


def _finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None


# ------------------------------------------------------------------------------------ evaluate
def evaluate(
    ws: Workspace,
    *,
    run: str | None = None,
    checkpoint: str = "best",
    dataset: str | None = None,
    split: str = _DEFAULT.split,
    n_samples: int = _DEFAULT.n_samples,
    max_tokens: int = _DEFAULT.max_tokens,
    temperature: float = _DEFAULT.temperature,
    top_p: float = _DEFAULT.top_p,
    seed: int = _DEFAULT.seed,
    compare_base: bool = _DEFAULT.compare_base,
    batch_size: int | None = _DEFAULT.batch_size,
    limit: int | None = _DEFAULT.limit,
    tool_cases: int = _DEFAULT.tool_cases,
    group_by: str | None = _DEFAULT.group_by,
    progress: Callable[[EvalProgress], None] | None = None,
) -> EvaluationResult:
    """Evaluate a run's checkpoint against its base model; see the module docstring."""
    t_start = time.perf_counter()
    say = progress or (lambda _p: None)
    _check_options(split, n_samples, max_tokens, temperature, top_p, batch_size or 1, limit)
    if tool_cases < 0:
        raise FtError(ErrorCode.USAGE, "--tool-cases must be 0 or more")
    ckpt, record, snap, data, resolved, manifest = _target(ws, run, checkpoint, dataset, split)
    if batch_size is None:
        # What fit in memory while training (with gradients) certainly fits for forward passes alone.
        batch_size = snap.config.training.batch_size if snap is not None else DEFAULT_BATCH_SIZE
    notes = [ckpt.note] if ckpt.note else []

    from ft.data.templates import stop_markers
    from ft.engine import evaluate as engine
    from ft.services.checkpoints import apply_checkpoint

    method = ckpt.method
    model, tok, precision = load(ckpt)
    # Stop at the tokenizer's EOS ids and at the template's end-of-turn marker.
    stops = stop_markers(tok, (manifest.get("template") or {}).get("name", "model"), ckpt.base_model)
    decode_reply = reply_decoder(tok, stops)
    # The preference report is per group of the dataset's --group-by field (or of this --group-by).
    pref_groups = preference_groups(data, resolved.path, split, group_by, manifest, compare_base)
    cases, tool_plan = _cases(
        data,
        resolved,
        split,
        n_samples,
        tool_cases,
        group_by,
        decode_reply,
        stops,
        notes,
        pref_groups is not None,
    )
    sampling = engine.SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        stop_ids=stops.ids,
    )
    scorer = Scorer(model, data, batch_size, limit, seed, sampling, tool_plan, cases, say, notes)
    base_scores = base_gens = None
    if compare_base:
        base_scores, base_gens = scorer.run("base")
    apply_checkpoint(model, ckpt)
    tuned_scores, tuned_gens = scorer.run("tuned")
    tool_replies = scorer.tool_replies

    scored = (tuned_scores, tuned_gens), (base_scores, base_gens)
    parts = _reports(data, *scored, cases, decode_reply, manifest, tok)
    notes += _coverage_notes(parts["tuned"], limit, len(data), len(tuned_scores.index))
    pref_rep = run_preference_report(snap, data, base_scores, tuned_scores, pref_groups)

    summary, improved = verdict(parts["tuned"], parts["base"], parts["label_gap"])
    out_dir, eval_id = _report_folder(ws, ckpt, split, resolved, trained_dataset(record, snap))
    result = EvaluationResult(
        id=eval_id,
        run_id=ckpt.run_id,
        checkpoint=ckpt.name,
        checkpoint_requested=ckpt.requested,
        checkpoint_path=ckpt.path,
        step=ckpt.step,
        method=method,
        base_model=ckpt.base_model,
        precision=precision,
        dataset=resolved.name,
        dataset_version=resolved.version,
        split=split,
        batch_size=batch_size,
        records=len(tuned_scores.index),
        split_records=len(data),
        **parts,
        preference=pref_rep,
        tools=tool_plan.report(tool_replies, where=lambda i: where(manifest, int(data.record_ids[i])))
        if tool_plan is not None
        else None,
        sampling=Sampling(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_tokens=stops.names
        ),
        verdict=summary,
        improved=improved,
        notes=notes,
        report_json=str(out_dir / REPORT_JSON),
        report_md=str(out_dir / REPORT_MD),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=0.0,
    )
    if (out_dir / REPORT_JSON).is_file():
        result.notes.append(f"replaced the previous report of this checkpoint and split in {out_dir}")
    result.seconds = round(time.perf_counter() - t_start, 2)
    write_report(out_dir, result)
    _register(ws, result, str(out_dir))
    return result


def _reports(
    data: Any, tuned: tuple[Any, Any], base: tuple[Any, Any], cases: Any, decode: Any, manifest: Any, tok: Any
) -> dict[str, Any]:
    """The (scores, generations) of the tuned and the base model as the result's reports: each model's, their
    difference, per label, and the generated samples side by side."""
    (tuned_scores, tuned_gens), (base_scores, base_gens) = tuned, base
    labels_all = data.labels[tuned_scores.index]
    sample_rows, tuned_texts, base_texts = scored_samples(
        cases, tuned_gens, base_gens, decode, manifest, data, tok
    )
    tuned_rep = model_report(tuned_scores, tuned_gens, tuned_texts, labels_all)
    base_rep = (
        model_report(base_scores, base_gens, base_texts, labels_all) if base_scores is not None else None
    )
    difference, labels, gap = compare(tuned_rep, base_rep)
    return dict(
        tuned=tuned_rep,
        base=base_rep,
        difference=difference,
        labels=labels,
        label_gap=gap,
        samples=sample_rows,
    )


def _cases(
    data: Any,
    resolved: Any,
    split: str,
    n_samples: int,
    tool_cases: int,
    group_by: str | None,
    decode_reply: Callable[[list[int]], str],
    stops: Any,
    notes: list[str],
    grouped_elsewhere: bool = False,
) -> tuple[list[Any], Any]:
    """(the records whose replies are generated, the tool-call evaluation plan or None)."""
    from ft.data.metrics import prompt_cases

    cases = prompt_cases(data, n_samples) if n_samples > 0 else []
    if n_samples > 0 and not cases:
        notes.append(
            "no record of this split has a prompt before its trained reply (plain text data): generation skipped"
        )
    template = stops.template.source if stops.template is not None else None
    tool_plan = tool_evaluation.plan(
        data,
        resolved.path,
        split,
        decode_reply,
        limit=tool_cases,
        group_by=group_by,
        template=template,
        grouped_elsewhere=grouped_elsewhere,
    )
    return cases, tool_plan


def _target(
    ws: Workspace, run: str | None, checkpoint: str, dataset: str | None, split: str
) -> tuple[ResolvedCheckpoint, RunRecord, RunSnapshot | None, Any, Any, dict[str, Any]]:
    """The checkpoint, its run's record and snapshot, and the split to score (with its dataset)."""
    from ft.services.datasets import check_tokenizer

    ckpt = resolve_checkpoint(ws, run, checkpoint)
    record, snap = run_info(ws, ckpt)
    data, resolved, manifest = _open_split(ws, dataset, split, trained_dataset(record, snap), ckpt)
    if len(data) == 0:
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"the {split} split of dataset {resolved.name} v{resolved.version} is empty",
            "prepare the dataset with a larger --val-split, or evaluate another split",
        )
    check_tokenizer(
        manifest,
        resolved.name,
        ckpt.base_model,
        Path(ckpt.base_model_dir),
        f"prepare the data for this model: ft dataset prepare SOURCE --name {resolved.name}-eval --model {ckpt.base_model}",
    )
    return ckpt, record, snap, data, resolved, manifest


def _check_options(
    split: str,
    n_samples: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    limit: int | None,
) -> None:
    if split not in SPLITS:
        raise FtError(ErrorCode.USAGE, f"--split {split!r} is not one of {', '.join(SPLITS)}")
    checks = [
        (n_samples >= 0, "--n-samples must be 0 or more"),
        (max_tokens >= 1, "--max-tokens must be at least 1"),
        (temperature >= 0, "--temperature must be 0 (greedy) or more"),
        (0 < top_p <= 1, "--top-p must be in (0, 1]"),
        (batch_size >= 1, "--batch-size must be at least 1"),
        (limit is None or limit >= 1, "--limit must be at least 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise FtError(ErrorCode.USAGE, msg)


def _open_split(
    ws: Workspace,
    dataset: str | None,
    split: str,
    run_dataset: tuple[str, int | None] | None,
    ckpt: ResolvedCheckpoint,
) -> tuple[Any, Any, dict[str, Any]]:
    from ft.data.store import load_split
    from ft.services.datasets import resolve_dataset

    if dataset:
        name, version = _parse_dataset(dataset)
    else:
        found = run_dataset
        if found is None:
            raise FtError(
                ErrorCode.USAGE,
                f"which dataset? run {ckpt.run_id or ckpt.path} does not record the one it was trained on",
                "pass --dataset NAME (see ft dataset list)",
            )
        name, version = found
    resolved = resolve_dataset(ws, name, version)
    if split not in resolved.splits:
        have = ", ".join(resolved.splits) or "none"
        hint = (
            "prepare the dataset with --test-split 0.1"
            if split == "test"
            else "prepare the dataset with a --val-split above 0"
        )
        raise FtError(
            ErrorCode.NOT_FOUND,
            f"dataset {name} v{resolved.version} has no {split!r} split (splits: {have})",
            hint,
        )
    return load_split(resolved.splits[split]), resolved, resolved.manifest


def _coverage_notes(tuned: ModelReport, limit: int | None, n_split: int, n_scored: int) -> list[str]:
    notes = []
    if tuned.by_label and len(tuned.by_label) == 1 and "desirable" in tuned.by_label:
        notes.append(
            "every record of this split is desirable (the dataset kept only desirable records); "
            "prepare it with --labels keep to measure the undesirable side"
        )
    if limit is not None and limit < n_split:
        notes.append(f"scored a fixed seeded subset of {n_scored} of {n_split} records (--limit)")
    if limit is None and n_split - n_scored:
        notes.append(f"{n_split - n_scored} records have no trained token and were not scored")
    return notes


def _report_folder(
    ws: Workspace, ckpt: ResolvedCheckpoint, split: str, resolved: Any, own: tuple[str, int | None] | None
) -> tuple[Path, str]:
    """(report folder, evaluation id). Another dataset than the run's own gets its own report folder
    instead of replacing the usual one."""
    folder_name = (
        f"{ckpt.name}-{split}"
        if own is not None and own[0] == resolved.name
        else f"{ckpt.name}-{resolved.name}-v{resolved.version}-{split}"
    )
    if ckpt.run_id:
        return ws.run_dir(ckpt.run_id) / EVAL_DIR / folder_name, f"{ckpt.run_id}-{folder_name}"
    out_dir = ws.root / EVAL_DIR / f"{ckpt.name}-{hashlib.sha256(ckpt.path.encode()).hexdigest()[:6]}-{split}"
    return out_dir, out_dir.name


def _register(ws: Workspace, r: EvaluationResult, path: str) -> None:
    ws.registry().upsert(
        TABLE,
        {"id": r.id},
        run_id=r.run_id,
        meta={
            "checkpoint": r.checkpoint,
            "step": r.step,
            "split": r.split,
            "dataset": r.dataset,
            "dataset_version": r.dataset_version,
            "records": r.records,
            "path": path,
            "tuned_loss": _finite(r.tuned.metrics.loss),
            "base_loss": _finite(r.base.metrics.loss) if r.base else None,
            "tuned_accuracy": _finite(r.tuned.metrics.accuracy),
            "base_accuracy": _finite(r.base.metrics.accuracy) if r.base else None,
            "method": r.method,
            "ft_version": __version__,
        },
    )
