"""`ft evaluate`'s report: report.md (and the table helpers the CLI shares), written with report.json.

Presentation only: the numbers are :class:`ft.services.evaluation.EvaluationResult`'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, Field

from ft import __version__
from ft.errors import ErrorCode, FtError
from ft.services import tool_evaluation
from ft.services.eval_preference import PreferenceReport
from ft.services.tool_evaluation import ToolReport
from ft.workspace import Workspace, validate_name
from ft.workspace.atomic import atomic_dir

TABLE = "evaluations"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
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
    """report.md: the header and metrics, then each section the result has, then the generations."""
    lines = _md_header(r) + _md_labels(r) + _md_preference(r) + tool_evaluation.markdown(r.tools)
    lines += _md_throughput(r)
    if r.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    if r.samples:
        lines += ["## Generations", ""]
        for k, smp in enumerate(r.samples, 1):
            lines += _md_sample(k, smp, with_base=r.base is not None)
    return "\n".join(lines).rstrip() + "\n"


def _md_header(r: EvaluationResult) -> list[str]:
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
    return lines + [
        "",
        "Loss, perplexity and accuracy are over the trained (assistant) tokens of every scored record; "
        "the text metrics are over the generated samples below.",
        "",
    ]


def _md_labels(r: EvaluationResult) -> list[str]:
    if not r.labels:
        return []
    lines = [
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
    return lines + [""]


def _md_preference(r: EvaluationResult) -> list[str]:
    p = r.preference
    if p is None:
        return []
    what = f"{p.pairs} chosen/rejected pairs" if p.pairs else "labelled replies"
    lines = [
        "## Preference (implicit rewards against the base)",
        "",
        f"Rewards are beta x (log p tuned - log p base) of each reply (beta {p.beta:g}), over {what}: "
        f"reward accuracy **{100 * p.reward_accuracy:.1f}%**, mean margin **{p.margin:+.4f}**.",
        "",
        "| replies | count | log-likelihood change (nats) | mean reward |",
        "|---|---:|---:|---:|",
    ]
    for rl in p.by_label:
        lines.append(f"| {rl.label} | {rl.replies} | {rl.mean_logp_change:+.4f} | {rl.mean_reward:+.4f} |")
    lines.append("")
    if not p.by_group:
        return lines
    lines += [
        f"Per `{p.group_by}`:",
        "",
        "| group | replies | pairs | reward accuracy | margin | desirable log-lik. change | "
        "undesirable log-lik. change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for g in p.by_group:
        ch = {rl.label: f"{rl.mean_logp_change:+.4f} ({rl.replies})" for rl in g.by_label}
        lines.append(
            f"| {g.group} | {g.replies} | {g.pairs} | {100 * g.reward_accuracy:.1f}% | "
            f"{fmt_diff(g.margin)} | {ch.get('desirable', '-')} | {ch.get('undesirable', '-')} |"
        )
    return lines + [""]


def _md_throughput(r: EvaluationResult) -> list[str]:
    lines = [
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
    return lines + [
        "",
        f"Sampling: temperature {s.temperature}, top-p {s.top_p}, seed {s.seed}, at most {s.max_tokens} tokens, "
        f"stop at {', '.join(f'`{x}`' for x in s.stop_tokens) or 'EOS'}.",
        "",
    ]


def _md_sample(k: int, smp: Sample, with_base: bool) -> list[str]:
    lines = [
        f"### {k}. {smp.where}",
        "",
        "Prompt (end):",
        "",
        "```",
        smp.prompt[-500:].replace("```", "'''"),
        "```",
        "",
        "| reference | tuned | base |" if with_base else "| reference | tuned |",
        "|---|---|---|" if with_base else "|---|---|",
        f"| {_cell(smp.reference)} | {_cell(smp.tuned)} |" + (f" {_cell(smp.base)} |" if with_base else ""),
    ]
    ts = smp.tuned_scores
    score = f"tuned: EM {ts.exact_match:.0f}, F1 {ts.token_f1:.2f}, ROUGE-L {ts.rouge_l:.2f}" + (
        " (hit max tokens)" if smp.tuned_finish == "length" else ""
    )
    if smp.base_scores:
        bs = smp.base_scores
        score += f"; base: EM {bs.exact_match:.0f}, F1 {bs.token_f1:.2f}, ROUGE-L {bs.rouge_l:.2f}" + (
            " (hit max tokens)" if smp.base_finish == "length" else ""
        )
    return lines + ["", score, ""]


def write_report(out_dir: Path, result: EvaluationResult) -> None:
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
