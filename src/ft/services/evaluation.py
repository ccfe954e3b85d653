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
import json
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ft import __version__
from ft.errors import ErrorCode, FtError
from ft.services import tool_evaluation
from ft.services.checkpoints import ResolvedCheckpoint, resolve_checkpoint
from ft.services.preference import PreferenceReport, preference_report
from ft.services.run_record import RunRecord, RunSnapshot
from ft.services.tool_evaluation import ToolReport
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_dir
from ft.workspace.run_folder import EVAL_DIR

log = logging.getLogger(__name__)

TABLE = "evaluations"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SPLITS = ("val", "test", "train")
DEFAULT_BATCH_SIZE = 8  # records per forward pass when the run does not say what fit while training
LABEL_NAMES = {1: "desirable", 0: "undesirable", -1: "unlabelled"}


# ------------------------------------------------------------------------------------ results
class EvalProgress(BaseModel):
    """One progress report: ``stage`` (e.g. "tuned: loss"), ``done`` of ``total`` units (records or replies)."""

    stage: str
    done: int
    total: int


class LossMetrics(BaseModel):
    loss: float = Field(description="mean cross-entropy per trained token (nats)")
    perplexity: float
    accuracy: float = Field(description="share of trained tokens the model ranks first (next-token accuracy)")
    tokens: int = Field(description="trained tokens scored")
    records: int


class TextMetrics(BaseModel):
    exact_match: float
    normalized_exact_match: float
    token_f1: float
    rouge_l: float


class Throughput(BaseModel):
    records_per_second: float = Field(description="records scored per second (loss/accuracy pass)")
    score_tokens_per_second: float = Field(description="input positions per second in the scoring pass")
    prompt_tokens: int = 0
    prompt_tokens_per_second: float = 0.0
    generation_tokens: int = 0
    generation_tokens_per_second: float = 0.0


class ModelReport(BaseModel):
    """Everything measured for one model (base or tuned)."""

    metrics: LossMetrics
    by_label: dict[str, LossMetrics] = Field(default_factory=dict)
    text: TextMetrics | None = None
    throughput: Throughput


class LabelComparison(BaseModel):
    label: str
    records: int
    base_loss: float | None
    tuned_loss: float
    change: float | None = Field(description="tuned - base loss")


class Sample(BaseModel):
    index: int = Field(description="record index in the split")
    where: str = Field(description="source file and line")
    prompt: str = Field(description="the conversation up to the last assistant turn, as the model sees it")
    reference: str
    tuned: str
    base: str | None = None
    tuned_scores: TextMetrics
    base_scores: TextMetrics | None = None
    tuned_finish: str = Field(description="stop (end of turn) or length (max_tokens reached)")
    base_finish: str | None = None


class Sampling(BaseModel):
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_tokens: list[str]


class EvaluationResult(BaseModel):
    """What `ft evaluate` measured, and where the report is."""

    id: str
    run_id: str | None
    checkpoint: str
    checkpoint_requested: str
    checkpoint_path: str
    step: int | None
    method: str
    base_model: str
    precision: str
    dataset: str
    dataset_version: int
    split: str
    batch_size: int = Field(description="records per forward pass (and replies generated together)")
    records: int = Field(description="records scored")
    split_records: int = Field(description="records in the split")
    tuned: ModelReport
    base: ModelReport | None = None
    difference: dict[str, float] = Field(default_factory=dict, description="tuned - base, per metric")
    labels: list[LabelComparison] = Field(default_factory=list)
    label_gap: float | None = Field(
        default=None,
        description="(tuned - base loss on undesirable) - (tuned - base loss on desirable); > 0: the tune moved "
        "towards the desirable replies and away from the undesirable ones",
    )
    samples: list[Sample] = Field(default_factory=list)
    tools: ToolReport | None = Field(
        default=None, description="tool-call metrics, when the split's replies call tools (docs/tools.md)"
    )
    preference: PreferenceReport | None = Field(
        default=None,
        description="implicit rewards beta (log p_tuned - log p_base) per reply: reward accuracy, margin and the "
        "log-likelihood change of desirable and undesirable replies (split with both labels, base compared)",
    )
    sampling: Sampling
    verdict: str
    improved: bool | None = Field(
        description="the tuned model's loss (on desirable replies, when labelled) is lower"
    )
    notes: list[str] = Field(default_factory=list)
    report_json: str
    report_md: str
    created_at: str
    seconds: float


# ------------------------------------------------------------------------------------ helpers
def _loss_metrics(t: Any) -> LossMetrics:
    return LossMetrics(
        loss=t.loss, perplexity=t.perplexity, accuracy=t.accuracy, tokens=t.tokens, records=t.examples
    )


def _text(s: Any) -> TextMetrics:
    return TextMetrics(**s.as_dict())


def _parse_dataset(spec: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@vN`` / ``NAME@N``."""
    from ft.services.datasets import parse_dataset_ref

    return parse_dataset_ref(spec)


def _run_info(ws: Workspace, ckpt: ResolvedCheckpoint) -> tuple[RunRecord, RunSnapshot | None]:
    """(the run's registry record, the snapshot this checkpoint was trained with -- None when unreadable)."""
    record = RunRecord.of(ws.registry().get("runs", id=ckpt.run_id) if ckpt.run_id else None)
    return record, ckpt.snapshot


def _run_dataset(record: RunRecord, snap: RunSnapshot | None) -> tuple[str, int | None] | None:
    """The prepared dataset (name, version) a run trained on, from its config snapshot or registry record."""
    if snap is not None and snap.dataset is not None:
        return snap.dataset.name, snap.dataset.version
    if record.dataset:
        return record.dataset, record.dataset_version
    return None


def _where(manifest: dict[str, Any], record_id: int) -> str:
    from ft.data.store import locate

    return locate(manifest.get("sources") or [], record_id)


def _verdict(tuned: ModelReport, base: ModelReport | None, gap: float | None) -> tuple[str, bool | None]:
    """One sentence: better or not, on the loss that matters (the desirable replies when labels were kept)."""
    labelled = "desirable" in tuned.by_label and len(tuned.by_label) >= 2
    t = tuned.by_label["desirable"] if labelled else tuned.metrics
    what = "loss on desirable replies" if labelled else "loss"
    if base is None:
        return f"tuned {what} {t.loss:.4f} (no base comparison)", None
    b = base.by_label["desirable"] if labelled else base.metrics
    d = t.loss - b.loss
    rel = d / b.loss if b.loss else 0.0
    tail = (
        ""
        if gap is None
        else (
            f"; gap {gap:+.4f} ("
            + (
                "undesirable replies became relatively less likely)"
                if gap > 0
                else "undesirable replies did not become relatively less likely)"
            )
        )
    )
    if d < 0:
        return (
            f"the tuned model is better: {what} {b.loss:.4f} -> {t.loss:.4f} ({rel:+.1%}), "
            f"perplexity {b.perplexity:.2f} -> {t.perplexity:.2f}{tail}"
        ), True
    return (
        f"the tuned model is NOT better on this split: {what} {b.loss:.4f} -> {t.loss:.4f} ({rel:+.1%}){tail}; "
        "check the learning rate, the number of steps, or whether this split matches the training data"
    ), False


def _finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None


# ------------------------------------------------------------------------------------ evaluate
def evaluate(
    ws: Workspace,
    *,
    run: str | None = None,
    checkpoint: str = "best",
    dataset: str | None = None,
    split: str = "val",
    n_samples: int = 8,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    compare_base: bool = True,
    batch_size: int | None = None,
    limit: int | None = None,
    tool_cases: int = 64,
    group_by: str | None = None,
    progress: Callable[[EvalProgress], None] | None = None,
) -> EvaluationResult:
    """Evaluate a run's checkpoint against its base model; see the module docstring."""
    t_start = time.perf_counter()
    say = progress or (lambda _p: None)
    _check_options(split, n_samples, max_tokens, temperature, top_p, batch_size or 1, limit)
    if tool_cases < 0:
        raise FtError(ErrorCode.USAGE, "--tool-cases must be 0 or more")
    ckpt = resolve_checkpoint(ws, run, checkpoint)
    record, snap = _run_info(ws, ckpt)
    if batch_size is None:
        # What fit in memory while training (with gradients) certainly fits for forward passes alone.
        batch_size = snap.config.training.batch_size if snap is not None else DEFAULT_BATCH_SIZE
    notes = [ckpt.note] if ckpt.note else []

    data, resolved, manifest = _open_split(ws, dataset, split, _run_dataset(record, snap), ckpt)
    if len(data) == 0:
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"the {split} split of dataset {resolved.name} v{resolved.version} is empty",
            "prepare the dataset with a larger --val-split, or evaluate another split",
        )

    import mlx.core as mx

    from ft.data.metrics import cut_at_stop, cut_text, end_of_turn, mean_scores, prompt_cases, score_text
    from ft.data.templates import make_template
    from ft.engine import evaluate as engine
    from ft.engine.losses import check_model
    from ft.services.checkpoints import apply_checkpoint, attach_adapters

    method = ckpt.method
    loaded = ckpt.load_base("evaluate")
    model, tok = loaded.model, loaded.tokenizer
    if method == "qlora":
        # QLoRA trains on quantized weights (a float base is quantized when the adapters go on): attach
        # the adapters now, at zero update, so base and tuned are scored on the same quantized weights.
        attach_adapters(model, ckpt)
    bits = sorted(
        {int(m.bits) for _, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")}
    )
    precision = loaded.dtype + (
        ", dequantized from the stored quantized weights" if loaded.dequantized else ""
    )
    if bits:
        precision = f"quantized ({'/'.join(map(str, bits))}-bit) linear layers, {precision} otherwise"
    _check_tokenizer(ws, manifest, ckpt, resolved.name)

    # Stop at the tokenizer's EOS ids and at the template's end-of-turn marker.
    stop_ids = {int(t) for t in (getattr(tok, "eos_token_ids", None) or [])}
    stop_strings: list[str] = []
    tmpl_source = None
    try:
        tmpl_name = (manifest.get("template") or {}).get("name", "model")
        special = {"bos_token": getattr(tok, "bos_token", None), "eos_token": getattr(tok, "eos_token", None)}
        tmpl = make_template(tmpl_name, getattr(tok, "chat_template", None), special, ckpt.base_model)
        tmpl_source = tmpl.source
        eot = end_of_turn(tmpl.render)
    except FtError:
        eot = ""
    if eot:
        stop_strings.append(eot)
        ids = tok.encode(eot, add_special_tokens=False)
        if len(ids) == 1:
            stop_ids.add(int(ids[0]))
    stop_names = sorted({tok.decode([t]) for t in stop_ids} | set(stop_strings))

    def decode_reply(ids: list[int]) -> str:
        return cut_text(tok.decode(cut_at_stop(ids, stop_ids)), stop_strings).strip()

    cases = prompt_cases(data, n_samples) if n_samples > 0 else []
    tool_plan = tool_evaluation.plan(
        data,
        resolved.path,
        split,
        decode_reply,
        limit=tool_cases,
        group_by=group_by,
        template=tmpl_source,
    )
    if n_samples > 0 and not cases:
        notes.append(
            "no record of this split has a prompt before its trained reply (plain text data): "
            "generation skipped"
        )
    sampling = engine.SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        stop_ids=tuple(sorted(stop_ids)),
    )
    # Score every position of every record: the split was already cut to the dataset's max_seq_length.
    max_seq = max(1, int(data.lengths.max()) - 1)

    def run_model(who: str) -> tuple[Any, Any]:
        split_info = check_model(model)
        notes.extend(f"{who}: {n}" for n in split_info.disabled())  # slower scoring, same numbers
        scores = engine.score(
            model,
            data,
            batch_size=batch_size,
            max_seq_length=max_seq,
            limit=limit,
            seed=seed,
            split=split_info,
            progress=lambda d, n: say(EvalProgress(stage=f"{who}: loss", done=d, total=n)),
        )
        if tool_plan is not None:
            tool_replies[who] = tool_plan.generate(
                model,
                sampling,
                progress=lambda d, n: say(EvalProgress(stage=f"{who}: tool calls", done=d, total=n)),
            )
        gens = None
        if cases:
            gens = engine.generate(
                model,
                [c.prompt for c in cases],
                sampling,
                progress=lambda d, n: say(EvalProgress(stage=f"{who}: generation", done=d, total=n)),
            )
        mx.clear_cache()
        return scores, gens

    tool_replies: dict[str, list[str]] = {}
    base_scores = base_gens = None
    if compare_base:
        base_scores, base_gens = run_model("base")
    apply_checkpoint(model, ckpt)
    tuned_scores, tuned_gens = run_model("tuned")

    # ---- aggregate
    labels_all = data.labels[tuned_scores.index]

    def report(scores: Any, gens: Any, texts: list[Any] | None) -> ModelReport:
        by_label = {}
        present = sorted({int(v) for v in labels_all.tolist()})
        if any(v >= 0 for v in present):
            for v in present:
                by_label[LABEL_NAMES.get(v, str(v))] = _loss_metrics(scores.total(labels_all == v))
        tp = Throughput(
            records_per_second=len(scores.index) / scores.seconds if scores.seconds else 0.0,
            score_tokens_per_second=scores.positions / scores.seconds if scores.seconds else 0.0,
        )
        if gens is not None:
            tp.prompt_tokens, tp.prompt_tokens_per_second = gens.prompt_tokens, gens.prompt_tps
            tp.generation_tokens, tp.generation_tokens_per_second = (
                gens.generation_tokens,
                gens.generation_tps,
            )
        mean = mean_scores(texts) if texts else None
        return ModelReport(
            metrics=_loss_metrics(scores.total()),
            by_label=by_label,
            text=_text(mean) if mean else None,
            throughput=tp,
        )

    samples: list[Sample] = []
    tuned_texts, base_texts = [], []
    for k, c in enumerate(cases):
        ref = decode_reply(list(c.reference))
        tuned_reply = decode_reply(tuned_gens.tokens[k])
        ts = score_text(tuned_reply, ref)
        tuned_texts.append(ts)
        base_reply = bs = None
        if base_gens is not None:
            base_reply = decode_reply(base_gens.tokens[k])
            bs = score_text(base_reply, ref)
            base_texts.append(bs)
        samples.append(
            Sample(
                index=c.index,
                where=_where(manifest, int(data.record_ids[c.index])),
                prompt=tok.decode(list(c.prompt)),
                reference=ref,
                tuned=tuned_reply,
                base=base_reply,
                tuned_scores=_text(ts),
                base_scores=_text(bs) if bs else None,
                tuned_finish=tuned_gens.finish[k],
                base_finish=base_gens.finish[k] if base_gens is not None else None,
            )
        )

    tuned_rep = report(tuned_scores, tuned_gens, tuned_texts)
    base_rep = report(base_scores, base_gens, base_texts) if base_scores is not None else None
    difference: dict[str, float] = {}
    labels: list[LabelComparison] = []
    gap = None
    if base_rep is not None:
        for key in ("loss", "perplexity", "accuracy"):
            difference[key] = getattr(tuned_rep.metrics, key) - getattr(base_rep.metrics, key)
        if tuned_rep.text and base_rep.text:
            for key in TextMetrics.model_fields:
                difference[key] = getattr(tuned_rep.text, key) - getattr(base_rep.text, key)
        difference = {k: v for k, v in difference.items() if math.isfinite(v)}
    for name, m in tuned_rep.by_label.items() if len(tuned_rep.by_label) >= 2 else ():
        b = base_rep.by_label.get(name) if base_rep else None
        labels.append(
            LabelComparison(
                label=name,
                records=m.records,
                base_loss=b.loss if b else None,
                tuned_loss=m.loss,
                change=(m.loss - b.loss) if b else None,
            )
        )
    changes = {lc.label: lc.change for lc in labels}
    if changes.get("desirable") is not None and changes.get("undesirable") is not None:
        gap = float(changes["undesirable"]) - float(changes["desirable"])  # type: ignore[arg-type]
    if tuned_rep.by_label and len(tuned_rep.by_label) == 1 and "desirable" in tuned_rep.by_label:
        notes.append(
            "every record of this split is desirable (the dataset kept only desirable records); "
            "prepare it with --labels keep to measure the undesirable side"
        )
    if limit is not None and limit < len(data):
        notes.append(
            f"scored a fixed seeded subset of {len(tuned_scores.index)} of {len(data)} records (--limit)"
        )
    skipped = len(data) - len(tuned_scores.index)
    if limit is None and skipped:
        notes.append(f"{skipped} records have no trained token and were not scored")

    pref_rep = None
    if base_scores is not None:
        pref_cfg = snap.config if snap is not None else None
        beta = (
            pref_cfg.preference.beta if pref_cfg is not None and pref_cfg.training.objective != "sft" else 1.0
        )
        pref_rep = preference_report(
            data.labels,
            data.record_ids,
            tuned_scores.index,
            base_scores.loss_sum,
            tuned_scores.loss_sum,
            beta,
        )
    verdict, improved = _verdict(tuned_rep, base_rep, gap)
    run_part = ckpt.run_id or "checkpoint"
    own = _run_dataset(record, snap)
    # Another dataset than the run's own gets its own report folder instead of replacing the usual one.
    folder_name = (
        f"{ckpt.name}-{split}"
        if own is not None and own[0] == resolved.name
        else f"{ckpt.name}-{resolved.name}-v{resolved.version}-{split}"
    )
    out_dir = (
        (ws.run_dir(ckpt.run_id) / EVAL_DIR / folder_name)
        if ckpt.run_id
        else (
            ws.root / EVAL_DIR / f"{ckpt.name}-{hashlib.sha256(ckpt.path.encode()).hexdigest()[:6]}-{split}"
        )
    )
    eval_id = f"{run_part}-{folder_name}" if ckpt.run_id else out_dir.name
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
        tuned=tuned_rep,
        base=base_rep,
        difference=difference,
        labels=labels,
        label_gap=gap,
        preference=pref_rep,
        samples=samples,
        tools=tool_plan.report(tool_replies, where=lambda i: _where(manifest, int(data.record_ids[i])))
        if tool_plan is not None
        else None,
        sampling=Sampling(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_tokens=stop_names
        ),
        verdict=verdict,
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
    _write_report(out_dir, result)
    ws.registry().upsert(
        TABLE,
        {"id": eval_id},
        run_id=ckpt.run_id,
        meta={
            "checkpoint": ckpt.name,
            "step": ckpt.step,
            "split": split,
            "dataset": resolved.name,
            "dataset_version": resolved.version,
            "records": result.records,
            "path": str(out_dir),
            "tuned_loss": _finite(tuned_rep.metrics.loss),
            "base_loss": _finite(base_rep.metrics.loss) if base_rep else None,
            "tuned_accuracy": _finite(tuned_rep.metrics.accuracy),
            "base_accuracy": _finite(base_rep.metrics.accuracy) if base_rep else None,
            "method": method,
            "ft_version": __version__,
        },
    )
    return result


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


def _check_tokenizer(ws: Workspace, manifest: dict[str, Any], ckpt: ResolvedCheckpoint, name: str) -> None:
    """The dataset must have been tokenized by the checkpoint's base model tokenizer."""
    tk = manifest.get("tokenizer") or {}
    if not tk or tk.get("model") == ckpt.base_model:
        return
    from ft.services.datasets import load_tokenizer

    mine = load_tokenizer(Path(ckpt.base_model_dir), ckpt.base_model).fingerprint()
    if tk.get("fingerprint") and tk["fingerprint"] != mine:
        raise FtError(
            ErrorCode.DATA_INVALID,
            f"dataset {name} was tokenized for {tk.get('model')!r}, but the checkpoint's base model is {ckpt.base_model!r} "
            "(their tokenizers differ)",
            f"prepare the data for this model: ft dataset prepare SOURCE --name {name}-eval --model {ckpt.base_model}",
        )


# ------------------------------------------------------------------------------------ report
def fmt_value(x: float | None, kind: str = "f") -> str:
    """kind: "f" (4 decimals: losses), "p" (2 decimals: perplexity), "%" (a share as a percentage)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if kind == "%":
        return f"{100 * x:.1f}%"
    return f"{x:,.2f}" if kind == "p" else f"{x:.4f}"


def fmt_diff(x: float | None, kind: str = "f") -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if kind == "%":
        return f"{100 * x:+.1f} pt"
    return f"{x:+,.2f}" if kind == "p" else f"{x:+.4f}"


METRIC_ROWS = [
    ("loss", "validation loss (nats/token)", "f", "lower"),
    ("perplexity", "perplexity", "p", "lower"),
    ("accuracy", "next-token accuracy", "%", "higher"),
    ("exact_match", "exact match", "%", "higher"),
    ("normalized_exact_match", "normalized exact match", "%", "higher"),
    ("token_f1", "token F1", "%", "higher"),
    ("rouge_l", "ROUGE-L", "%", "higher"),
]


def metric_rows(r: EvaluationResult) -> list[tuple[str, str, float | None, float | None, float | None, str]]:
    """(key, label, base, tuned, tuned - base, kind) for the metrics table (shared by report.md and the CLI)."""
    rows = []
    for key, label, kind, _better in METRIC_ROWS:
        if key in ("loss", "perplexity", "accuracy"):
            tuned = getattr(r.tuned.metrics, key)
            base = getattr(r.base.metrics, key) if r.base else None
        else:
            if r.tuned.text is None:
                continue
            tuned = getattr(r.tuned.text, key)
            base = getattr(r.base.text, key) if r.base and r.base.text else None
        rows.append((key, label, base, tuned, r.difference.get(key), kind))
    return rows


def better(key: str, diff: float | None) -> bool | None:
    """Whether a difference is an improvement (None when there is none)."""
    if diff is None or diff == 0 or not math.isfinite(diff):
        return None
    lower = next((b == "lower" for k, _, _, b in METRIC_ROWS if k == key), False)
    return diff < 0 if lower else diff > 0


def _cell(text: str | None, limit: int = 600) -> str:
    if text is None:
        return "–"
    t = text if len(text) <= limit else text[:limit] + " …"
    return t.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def render_markdown(r: EvaluationResult) -> str:
    what = f"run `{r.run_id}`" if r.run_id else "checkpoint"
    lines = [
        f"# Evaluation: {what}, checkpoint `{r.checkpoint}` ({r.checkpoint_requested}), split `{r.split}`",
        "",
        f"- base model: `{r.base_model}` ({r.precision}); method: {r.method}",
        f"- dataset: `{r.dataset}` v{r.dataset_version}, split `{r.split}`: {r.records} of {r.split_records} records, "
        f"{r.tuned.metrics.tokens:,} trained tokens",
        f"- checkpoint folder: `{r.checkpoint_path}`",
        f"- created {r.created_at} by ft {__version__} in {r.seconds:.1f}s",
        "",
        f"**{r.verdict}**",
        "",
        "## Metrics",
        "",
        "| metric | base | tuned | difference |",
        "|---|---:|---:|---:|",
    ]
    for key, label, base, tuned, diff, kind in metric_rows(r):
        mark = {True: " ✓", False: " ✗", None: ""}[better(key, diff)]
        lines.append(
            f"| {label} | {fmt_value(base, kind)} | {fmt_value(tuned, kind)} | {fmt_diff(diff, kind)}{mark} |"
        )
    lines += [
        "",
        "Loss, perplexity and accuracy are over the trained (assistant) tokens of every scored record; "
        "the text metrics are over the generated samples below.",
        "",
    ]
    if r.labels:
        lines += [
            "## By label",
            "",
            "| label | records | base loss | tuned loss | change |",
            "|---|---:|---:|---:|---:|",
        ]
        for lc in r.labels:
            lines.append(
                f"| {lc.label} | {lc.records} | {fmt_value(lc.base_loss)} | {fmt_value(lc.tuned_loss)} | {fmt_diff(lc.change)} |"
            )
        if r.label_gap is not None:
            lines += [
                "",
                f"Gap (change on undesirable − change on desirable): **{r.label_gap:+.4f}** "
                f"({'the tune separates them: good' if r.label_gap > 0 else 'the tune does not separate them'}).",
            ]
        lines.append("")
    if r.preference is not None:
        p = r.preference
        what = f"{p.pairs} chosen/rejected pairs" if p.pairs else "labelled replies"
        lines += [
            "## Preference (implicit rewards against the base)",
            "",
            f"Rewards are beta x (log p tuned - log p base) of each reply (beta {p.beta:g}), over {what}: "
            f"reward accuracy **{100 * p.reward_accuracy:.1f}%**, mean margin **{p.margin:+.4f}**.",
            "",
            "| replies | count | log-likelihood change (nats) | mean reward |",
            "|---|---:|---:|---:|",
        ]
        for rl in p.by_label:
            lines.append(
                f"| {rl.label} | {rl.replies} | {rl.mean_logp_change:+.4f} | {rl.mean_reward:+.4f} |"
            )
        lines.append("")
    lines += tool_evaluation.markdown(r.tools)
    lines += [
        "## Throughput",
        "",
        "| model | records/s (scoring) | prompt tok/s | generation tok/s | generated tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for who, rep in (("base", r.base), ("tuned", r.tuned)):
        if rep is not None:
            t = rep.throughput
            lines.append(
                f"| {who} | {t.records_per_second:.1f} | {t.prompt_tokens_per_second:.0f} | "
                f"{t.generation_tokens_per_second:.1f} | {t.generation_tokens} |"
            )
    s = r.sampling
    lines += [
        "",
        f"Sampling: temperature {s.temperature}, top-p {s.top_p}, seed {s.seed}, at most {s.max_tokens} tokens, "
        f"stop at {', '.join(f'`{x}`' for x in s.stop_tokens) or 'EOS'}.",
        "",
    ]
    if r.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    if r.samples:
        lines += ["## Generations", ""]
        for k, smp in enumerate(r.samples, 1):
            prompt_tail = smp.prompt[-500:]
            lines += [
                f"### {k}. {smp.where}",
                "",
                "Prompt (end):",
                "",
                "```",
                prompt_tail.replace("```", "'''"),
                "```",
                "",
            ]
            head = "| reference | tuned | base |" if r.base else "| reference | tuned |"
            lines += [head, "|---|---|---|" if r.base else "|---|---|"]
            row = f"| {_cell(smp.reference)} | {_cell(smp.tuned)} |" + (
                f" {_cell(smp.base)} |" if r.base else ""
            )
            lines.append(row)
            ts = smp.tuned_scores
            score = f"tuned: EM {ts.exact_match:.0f}, F1 {ts.token_f1:.2f}, ROUGE-L {ts.rouge_l:.2f}" + (
                " (hit max tokens)" if smp.tuned_finish == "length" else ""
            )
            if smp.base_scores:
                bs = smp.base_scores
                score += (
                    f"; base: EM {bs.exact_match:.0f}, F1 {bs.token_f1:.2f}, ROUGE-L {bs.rouge_l:.2f}"
                    + (" (hit max tokens)" if smp.base_finish == "length" else "")
                )
            lines += ["", score, ""]
    return "\n".join(lines).rstrip() + "\n"


def _write_report(out_dir: Path, result: EvaluationResult) -> None:
    """report.json + report.md, written together into a temporary folder and renamed into place.

    Re-evaluating the same checkpoint and split replaces the previous report (it is derived data that the
    same command rebuilds); the checkpoint itself is never touched."""
    try:
        with atomic_dir(out_dir, overwrite=True) as tmp:
            (tmp / REPORT_JSON).write_text(
                json.dumps(result.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
            )
            (tmp / REPORT_MD).write_text(render_markdown(result), encoding="utf-8")
    except OSError as e:
        raise FtError(
            ErrorCode.ENVIRONMENT,
            f"could not write the evaluation report to {out_dir}: {e}",
            "check free disk space and permissions",
        ) from e


# ------------------------------------------------------------------------------------ listing
class EvaluationSummary(BaseModel):
    id: str
    run_id: str | None
    checkpoint: str
    split: str
    dataset: str | None
    records: int | None
    base_loss: float | None
    tuned_loss: float | None
    path: str | None
    created_at: str


def list_evaluations(ws: Workspace, run: str | None = None) -> list[EvaluationSummary]:
    """Past evaluations from the registry (of one run when ``run`` is given), oldest first."""
    reg = ws.registry()
    rows = reg.list(TABLE, run_id=validate_name(run, "run id")) if run else reg.list(TABLE)
    out = []
    for r in rows:
        m = r.get("meta") or {}
        out.append(
            EvaluationSummary(
                id=r["id"],
                run_id=r.get("run_id"),
                checkpoint=str(m.get("checkpoint", "")),
                split=str(m.get("split", "")),
                dataset=m.get("dataset"),
                records=m.get("records"),
                base_loss=m.get("base_loss"),
                tuned_loss=m.get("tuned_loss"),
                path=m.get("path"),
                created_at=r["created_at"],
            )
        )
    return out
