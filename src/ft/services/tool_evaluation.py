"""Tool-call evaluation for `ft evaluate`: on a split whose replies call tools, does the model call the
right tool with the right arguments, and answer in text where the reference does?

Every trained run (assistant turn) of the split's records is one case, in split order, up to ``limit``
cases: the prompt is the conversation before that turn (exactly the tokens the model was trained to
continue), the reference is the turn itself. The reference and each model's generation are parsed into
tool calls with the template's parser (:mod:`ft.data.toolcalls`) and scored by :mod:`ft.data.toolmetrics`,
for the base and the tuned model, overall, per label and per ``--group-by`` value. A split whose
references call no tool gets no tool section.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ft.data.toolmetrics import (
    LOWER_IS_BETTER,
    RATE_KEYS,
    Call,
    ToolCase,
    ToolMetrics,
    as_calls,
    grouped,
    tool_metrics,
    tool_schemas,
)
from ft.errors import ErrorCode, FtError

LABEL_NAMES = {1: "desirable", 0: "undesirable", -1: "unlabelled"}

SHOWN_SAMPLES = 4

# parse(text) -> (calls, malformed): the calls a reply holds, and whether it has a call that does not parse
Parser = Callable[[str], tuple[list[Call], bool]]


@dataclass(frozen=True)
class ToolTurn:
    """One case: an assistant turn of a record, with what is needed to score a generation against it."""

    index: int  # example index in the split
    prompt: np.ndarray  # int32 tokens before the turn
    reference: str  # the turn's text (decoded, cut at the end of turn)
    calls: list[Call]  # the reference's calls (empty: it answers in text)
    label: str
    group: str | None
    schemas: Mapping[str, Any] | None


def trained_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of trained tokens that has something before it."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[False], m, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True) if a > 0]


def tool_turns(
    data: Any,
    decode: Callable[[list[int]], str],
    parse: Parser,
    *,
    limit: int,
    record_info: Callable[[int], tuple[Mapping[str, Any] | None, str | None]] | None = None,
) -> list[ToolTurn]:
    """Up to ``limit`` cases from the split's examples in order; [] when no reference turn calls a tool.

    ``record_info(i)``: the example's tool schemas (``{name: parameters}``, None when unknown) and its
    ``--group-by`` value."""
    out: list[ToolTurn] = []
    any_call = False
    for i in range(len(data)):
        if len(out) >= limit:
            break
        toks = np.asarray(data.tokens(i))
        runs = trained_runs(np.asarray(data.mask(i)))
        if not runs:
            continue
        schemas, group = record_info(i) if record_info else (None, None)
        label = LABEL_NAMES.get(int(data.labels[i]), str(int(data.labels[i])))
        for a, b in runs:
            if len(out) >= limit:
                break
            text = decode([int(t) for t in toks[a:b]])
            calls, _ = parse(text)
            any_call = any_call or bool(calls)
            out.append(ToolTurn(i, toks[:a].astype(np.int32), text, calls, label, group, schemas))
    return out if any_call else []


# ------------------------------------------------------------------------------------ results
class ToolComparison(BaseModel):
    tuned: ToolMetrics
    base: ToolMetrics | None = None


class ToolSample(BaseModel):
    index: int
    where: str
    reference: str
    tuned: str
    base: str | None = None


class ToolReport(BaseModel):
    """`ft evaluate`'s tool-call section."""

    cases: int = Field(description="assistant turns scored (each trained run of the scored records)")
    records: int
    overall: ToolComparison
    by_label: dict[str, ToolComparison] = Field(default_factory=dict)
    group_by: str | None = None
    by_group: dict[str, ToolComparison] = Field(default_factory=dict)
    samples: list[ToolSample] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


def build_report(
    turns: Sequence[ToolTurn],
    tuned: Sequence[str],
    base: Sequence[str] | None,
    parse: Parser,
    *,
    group_by: str | None = None,
    where: Callable[[int], str] = str,
) -> ToolReport:
    """Score the generations (one per turn, per model) and put the report together."""

    def cases(replies: Sequence[str]) -> list[ToolCase]:
        out = []
        for t, reply in zip(turns, replies, strict=True):
            calls, malformed = parse(reply)
            out.append(ToolCase(t.calls, calls, malformed, t.schemas, t.label, t.group))
        return out

    tc = cases(tuned)
    bc = cases(base) if base is not None else None

    def compare(key: Callable[[ToolCase], str | None]) -> dict[str, ToolComparison]:
        t = grouped(tc, key)
        b = grouped(bc, key) if bc is not None else {}
        return {k: ToolComparison(tuned=v, base=b.get(k)) for k, v in t.items()}

    overall = ToolComparison(tuned=tool_metrics(tc), base=tool_metrics(bc) if bc else None)
    by_label = compare(lambda c: c.label)
    notes = []
    if all(t.schemas is None for t in turns):
        notes.append("the records carry no tool definitions: JSON-schema validity was not measured")
    samples = []
    # Show the turns where the models differ first (that is where the tune shows), then the rest.
    order = sorted(range(len(turns)), key=lambda k: (base is None or base[k] == tuned[k], k))
    for k in order[:SHOWN_SAMPLES]:
        t = turns[k]
        samples.append(
            ToolSample(
                index=t.index,
                where=where(t.index),
                reference=t.reference,
                tuned=tuned[k],
                base=base[k] if base is not None else None,
            )
        )
    return ToolReport(
        cases=len(turns),
        records=len({t.index for t in turns}),
        overall=overall,
        by_label=by_label if len(by_label) > 1 else {},
        group_by=group_by,
        by_group=compare(lambda c: c.group) if group_by else {},
        samples=samples,
        notes=notes,
    )


# ------------------------------------------------------------------------------------ rendering
ROWS = [
    ("parseable_call_rate", "parseable-call rate"),
    ("tool_name_accuracy", "tool-name accuracy"),
    ("arguments_exact_match", "arguments exact match"),
    ("arguments_f1", "arguments F1 (per key)"),
    ("schema_valid_rate", "arguments valid (JSON schema)"),
    ("answered_instead_of_call", "answered where the reference calls"),
    ("called_instead_of_answer", "called where the reference answers"),
]
assert {k for k, _ in ROWS} == set(RATE_KEYS)


def rows(c: ToolComparison) -> list[tuple[str, str, float | None, float | None, float | None, bool | None]]:
    """(key, label, base, tuned, tuned - base, better) for a metrics table (report.md and the CLI)."""
    out = []
    for key, label in ROWS:
        t = getattr(c.tuned, key)
        b = getattr(c.base, key) if c.base else None
        diff = t - b if t is not None and b is not None else None
        better = None if not diff else (diff < 0) == (key in LOWER_IS_BETTER)
        out.append((key, label, b, t, diff, better))
    return out


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def pts(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f} pt"


def _cell(text: str | None, limit: int = 400) -> str:
    if text is None:
        return "–"
    t = text if len(text) <= limit else text[:limit] + " …"
    return t.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def markdown(r: ToolReport | None) -> list[str]:
    """The tool-call section of report.md (no lines when there is no report)."""
    if r is None:
        return []
    o = r.overall
    lines = [
        "## Tool calls",
        "",
        f"{r.cases} assistant turns of {r.records} records: {o.tuned.call_cases} where the reference calls a "
        f"tool, {o.tuned.answer_cases} where it answers in text (definitions: docs/tools.md).",
        "",
        "| metric | base | tuned | difference |",
        "|---|---:|---:|---:|",
    ]
    for _key, label, b, t, d, better in rows(o):
        mark = {True: " ✓", False: " ✗", None: ""}[better]
        lines.append(f"| {label} | {pct(b)} | {pct(t)} | {pts(d)}{mark} |")
    lines.append("")
    conf = " · ".join(f"{k} {v}" for k, v in o.tuned.confusion.items())
    lines.append(f"Tuned model, reference/generation: {conf}; malformed calls: {o.tuned.malformed_calls}.")
    if o.base:
        conf = " · ".join(f"{k} {v}" for k, v in o.base.confusion.items())
        lines.append(f"Base model, reference/generation: {conf}; malformed calls: {o.base.malformed_calls}.")
    lines.append("")
    for title, table in (("label", r.by_label), (f"`{r.group_by}`", r.by_group)):
        if not table:
            continue
        lines += [
            f"### Tool calls by {title}",
            "",
            "| value | turns | calls | parseable (base → tuned) | tool name (base → tuned) | "
            "arguments exact (base → tuned) | wrong call/answer choice (base → tuned) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for value, c in table.items():
            tuned, base = c.tuned, c.base

            def pair(key: str, t: ToolMetrics = tuned, b: ToolMetrics | None = base) -> str:
                return f"{pct(getattr(b, key)) if b else '–'} → {pct(getattr(t, key))}"

            def wrong(s: ToolMetrics | None) -> str:
                if s is None or not s.cases:
                    return "–"
                n = s.confusion.get("call/answer", 0) + s.confusion.get("answer/call", 0)
                return pct(n / s.cases)

            lines.append(
                f"| {value} | {tuned.cases} | {tuned.call_cases} | {pair('parseable_call_rate')} | "
                f"{pair('tool_name_accuracy')} | {pair('arguments_exact_match')} | {wrong(base)} → {wrong(tuned)} |"
            )
        lines.append("")
    for n in r.notes:
        lines.append(f"- {n}")
    if r.notes:
        lines.append("")
    if r.samples:
        lines += ["### Tool-call generations", ""]
        head = "| where | reference | tuned | base |" if any(s.base is not None for s in r.samples) else None
        lines += [head or "| where | reference | tuned |", "|---|---|---|---|" if head else "|---|---|---|"]
        for s in r.samples:
            row = f"| {s.where} | {_cell(s.reference)} | {_cell(s.tuned)} |"
            lines.append(row + (f" {_cell(s.base)} |" if head else ""))
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------ plan
class ToolPlan:
    """The tool-call cases of a split, ready to be generated for each model and then reported."""

    def __init__(
        self,
        turns: list[ToolTurn],
        parse: Parser,
        decode: Callable[[list[int]], str],
        group_by: str | None,
        notes: list[str],
    ):
        self.turns, self.parse, self.decode, self.group_by, self.notes = turns, parse, decode, group_by, notes

    def generate(
        self, model: Any, sampling: Any, progress: Callable[[int, int], None] | None = None
    ) -> list[str]:
        """Each turn's reply by ``model`` (greedy or as ``sampling`` says), decoded and cut at the end of turn."""
        from ft.engine import evaluate as engine

        gens = engine.generate(model, [t.prompt for t in self.turns], sampling, progress=progress)
        return [self.decode(list(ids)) for ids in gens.tokens]

    def report(self, replies: Mapping[str, list[str]], where: Callable[[int], str] = str) -> ToolReport:
        r = build_report(
            self.turns, replies["tuned"], replies.get("base"), self.parse, group_by=self.group_by, where=where
        )
        r.notes = self.notes + r.notes
        return r


def parser(style: str) -> Parser:
    """``parse(text) -> (calls, malformed)`` for a tool-call style of :mod:`ft.data.toolcalls`."""
    from ft.data.toolcalls import parse_tool_calls

    def parse(text: str) -> tuple[list[Call], bool]:
        out = parse_tool_calls(text, style)
        return as_calls(out.tool_calls), out.error is not None

    return parse


def dataset_style(folder: Path, template: str | None) -> str:
    """The tool-call style the dataset was trained in: prepare's statistics, else the template's own."""
    from ft.data.prepare import STATS
    from ft.data.toolcalls import detect_style

    try:
        stats = json.loads((Path(folder) / STATS).read_text(encoding="utf-8"))
        style = ((stats or {}).get("tools") or {}).get("style")
    except (OSError, ValueError, AttributeError):
        style = None
    return style or detect_style(template)


def split_groups(folder: Path, split: str, group_by: str) -> list[str | None]:
    """The ``group_by`` field of every example of the split (None where a record lacks it); a usage
    error when no record has it."""
    from ft.data.store import group_values

    groups = group_values(folder, split, group_by)
    if all(g is None for g in groups):
        raise FtError(
            ErrorCode.USAGE,
            f"--group-by {group_by}: no record of this split has a {group_by!r} field",
            "name an extra field the records carry (ft dataset show NAME lists one record)",
        )
    return groups


def record_info(
    data: Any, folder: Path, split: str, group_by: str | None
) -> tuple[Callable[[int], tuple[Mapping[str, Any] | None, str | None]], list[str]]:
    """``info(i) -> (tool schemas, group value)`` for example ``i`` of the split, and notes."""
    from ft.data.tool_store import read_record_tools

    notes = []
    by_record = read_record_tools(folder)
    if by_record is None:
        notes.append(
            "this dataset stores no tool definitions (prepared by an older ft, or its records have none): "
            "JSON-schema validity is not measured; prepare it again to measure it"
        )
    groups = split_groups(folder, split, group_by) if group_by else None
    cache: dict[int, Mapping[str, Any]] = {}

    def info(i: int) -> tuple[Mapping[str, Any] | None, str | None]:
        schemas = None
        if by_record is not None:
            tools = by_record.get(int(data.record_ids[i]))
            if tools is not None:
                schemas = cache.setdefault(id(tools), tool_schemas(tools))
        group = None if groups is None else (groups[i] if groups[i] is not None else "(none)")
        return schemas, group

    return info, notes


def plan(
    data: Any,
    folder: Path,
    split: str,
    decode: Callable[[list[int]], str],
    *,
    limit: int,
    group_by: str | None = None,
    template: str | None = None,
    grouped_elsewhere: bool = False,
) -> ToolPlan | None:
    """The split's tool-call cases (None when ``limit`` is 0 or no reference turn calls a tool).

    ``grouped_elsewhere``: ``group_by`` also serves another per-group report (preference), so a split
    without tool calls is no usage error."""
    if limit <= 0:
        if group_by and not grouped_elsewhere:
            raise FtError(ErrorCode.USAGE, "--group-by needs tool-call cases: leave --tool-cases above 0")
        return None
    parse = parser(dataset_style(folder, template))
    info, notes = record_info(data, folder, split, group_by)
    turns = tool_turns(data, decode, parse, limit=limit, record_info=info)
    if not turns:
        if group_by and not grouped_elsewhere:
            raise FtError(
                ErrorCode.USAGE,
                "--group-by reports tool-call metrics per group, but no reply of this split calls a tool",
            )
        return None
    if len(turns) == limit:
        notes.append(f"scored the first {limit} assistant turns of the split (--tool-cases {limit})")
    return ToolPlan(turns, parse, decode, group_by, notes)
