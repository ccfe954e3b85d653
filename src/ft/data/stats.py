"""Statistics of a prepared dataset (stats.json, the summary table, --json) and the length plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field


class LengthStats(BaseModel):
    """Token lengths of examples."""

    count: int = 0
    min: int = 0
    p50: int = 0
    p90: int = 0
    p99: int = 0
    max: int = 0
    mean: float = 0.0

    @classmethod
    def of(cls, lengths: np.ndarray) -> LengthStats:
        if len(lengths) == 0:
            return cls()
        p50, p90, p99 = (int(round(float(v))) for v in np.percentile(lengths, [50, 90, 99]))
        return cls(
            count=len(lengths),
            min=int(lengths.min()),
            p50=p50,
            p90=p90,
            p99=p99,
            max=int(lengths.max()),
            mean=round(float(lengths.mean()), 1),
        )


class Histogram(BaseModel):
    """Counts of examples per token-length bin: bin i is [edges[i], edges[i+1])."""

    edges: list[int] = Field(default_factory=list)
    counts: list[int] = Field(default_factory=list)

    @classmethod
    def of(cls, lengths: np.ndarray, bins: int = 20) -> Histogram:
        if len(lengths) == 0:
            return cls()
        hi = int(lengths.max()) + 1
        lo = int(lengths.min())
        step = max(1, math.ceil((hi - lo) / bins))
        edges = list(range(lo, hi + step, step))
        counts, _ = np.histogram(lengths, bins=edges)
        return cls(edges=edges, counts=[int(c) for c in counts])


class TurnStats(BaseModel):
    """Non-system messages per record (1 for plain text)."""

    min: int = 0
    mean: float = 0.0
    max: int = 0
    distribution: dict[str, int] = Field(default_factory=dict)


class SplitStats(BaseModel):
    records: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    labels: dict[str, int] = Field(default_factory=dict)
    desirable_ratio: float | None = None
    lengths: LengthStats = LengthStats()


class RejectedExample(BaseModel):
    where: str
    reason: str
    message: str


class ToolStats(BaseModel):
    """Tool use in the kept records (absent from stats.json when the data has none)."""

    records: int = 0
    """Kept records with tool definitions, tool calls or tool results."""
    calls: int = 0
    """Tool calls made by the assistant in those records."""
    results: int = 0
    """Tool result messages."""
    without_definitions: int = 0
    """Records with calls but no tool definitions (their own or --tools): names not checked against a list."""
    text_not_rendered: int = 0
    """Assistant turns whose text next to their calls the model's template does not render (Mistral, Llama 3.1)."""
    warnings: dict[str, int] = Field(default_factory=dict)
    """Tolerated tool defects by reason code (unknown_tool: a call to a tool not in the list)."""
    warning_examples: list[RejectedExample] = Field(default_factory=list)
    rendering: str = ""
    """template: the model's chat template renders the calls; fallback: ft's fallback (no tool support)."""
    style: str = ""
    """How the calls appear in the trained text: hermes, mistral, llama3 or fallback (ft.data.toolcalls)."""
    note: str = ""


class DatasetStats(BaseModel):
    """Everything `ft dataset prepare` reports; also stored as stats.json next to the splits."""

    records_read: int = 0
    """Non-blank records found in the source."""
    blank_lines: int = 0
    kept: int = 0
    """Records that became training or evaluation examples."""
    bad: int = 0
    """Invalid records (count against max_bad)."""
    bad_fraction: float = 0.0
    max_bad: float = 0.05
    rejected: dict[str, int] = Field(default_factory=dict)
    """Records dropped, by reason code (bad ones and filtered ones: duplicate, too_long)."""
    rejected_examples: list[RejectedExample] = Field(default_factory=list)
    label_policy: str = "sft-desirable"
    labels_found: dict[str, int] = Field(default_factory=dict)
    """Labels of the valid records before the label policy: desirable / undesirable / unlabelled."""
    skipped_undesirable: int = 0
    """Valid records left out because they are labelled undesirable (label policy sft-desirable)."""
    label_note: str = ""
    truncated: int = 0
    on_long: str = "drop"
    max_seq_length: int = 0
    formats: dict[str, int] = Field(default_factory=dict)
    turns: TurnStats = TurnStats()
    splits: dict[str, SplitStats] = Field(default_factory=dict)
    lengths: LengthStats = LengthStats()
    histogram: Histogram = Histogram()
    trainable_tokens: int = 0
    """Trained (masked-in) tokens in the train split."""
    shared_prompts: int = 0
    """Prompts found in more than one split (the contamination check; 0 = clean)."""
    grouped_records: int = 0
    """Records sharing their prompt with another record (kept in the same split)."""
    dropped_chars: dict[str, int] = Field(default_factory=dict)
    """Kept records holding a character the tokenizer's vocabulary lacks (e.g. "U+0004": 12): the
    character is dropped from the tokens, exactly as the model's own tokenizer drops it."""
    conflicting_labels: int = 0
    """Conversations found both labelled desirable and undesirable (identical content)."""
    tools: ToolStats | None = None
    """Tool calls, results and definitions in the kept records; None when there are none."""
    split_method: str = ""
    """How the records were split: stratified (by label and maybe a metadata key) or as given."""
    group_by: str | None = None
    """The metadata key evaluation reports per value of (``--group-by``)."""
    groups: dict[str, int] = Field(default_factory=dict)
    """Kept records per value of ``group_by`` ("(none)": records without that field)."""
    batch_size: int | None = None
    grad_accumulation_steps: int | None = None
    steps_per_epoch: int | None = None
    """Optimizer steps for one pass over the train split with the current batch settings."""


def label_counts(labels: np.ndarray) -> dict[str, int]:
    return {
        "desirable": int(np.count_nonzero(labels == 1)),
        "undesirable": int(np.count_nonzero(labels == 0)),
        "unlabelled": int(np.count_nonzero(labels < 0)),
    }


def steps_per_epoch(train_records: int, batch_size: int | None, grad_acc: int | None) -> int | None:
    if not batch_size or not grad_acc:
        return None
    return math.ceil(train_records / (batch_size * grad_acc)) if train_records else 0


def turn_stats(turns: np.ndarray) -> TurnStats:
    if len(turns) == 0:
        return TurnStats()
    vals, cnt = np.unique(turns, return_counts=True)
    return TurnStats(
        min=int(turns.min()),
        mean=round(float(turns.mean()), 2),
        max=int(turns.max()),
        distribution={str(int(v)): int(c) for v, c in zip(vals, cnt, strict=True)},
    )


def plot_lengths(
    path: Path, lengths_by_split: dict[str, np.ndarray], max_seq_length: int, title: str
) -> None:
    """A PNG histogram of example lengths per split, with the max_seq_length limit marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    data = [(k, v) for k, v in lengths_by_split.items() if len(v)]
    if data:
        hi = max(int(v.max()) for _, v in data)
        edges = np.linspace(0, max(hi, 1) * 1.02, 41)
        # Stacked outlines drawn as one artist per split (far cheaper than one bar patch per bin).
        base = np.zeros(len(edges) - 1)
        for name, v in data:
            counts, _ = np.histogram(v, bins=edges)
            ax.stairs(base + counts, edges, baseline=base, fill=True, alpha=0.8, label=f"{name} ({len(v):,})")
            base = base + counts
        if max_seq_length <= hi * 1.5:
            ax.axvline(max_seq_length, color="red", linestyle="--", label=f"max_seq_length {max_seq_length}")
        ax.legend()
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(title)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)
    fig.savefig(path)
    plt.close(fig)
