"""`ft evaluate [RUN] [--checkpoint best|latest|step-N|PATH] [--dataset NAME] [--split val|test] ...`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ft.cli.common import emit, err_console, get_workspace, notes
from ft.cli.options import CheckpointOpt, JsonOpt, RunArg, command_args, dataset_option, field_option
from ft.services import eval_report as report
from ft.services import evaluation as svc
from ft.services import tool_evaluation as tool_eval


def _render(con: Console, r: svc.EvaluationResult) -> None:
    where = f"run [bold]{r.run_id}[/]" if r.run_id else "checkpoint"
    con.print(
        f"{where}, checkpoint [bold]{r.checkpoint}[/] ({r.checkpoint_requested}, {r.method}) on "
        f"[bold]{r.dataset}[/] v{r.dataset_version} [bold]{r.split}[/]: {r.records} records, "
        f"{r.tuned.metrics.tokens:,} trained tokens; base {r.base_model} ({r.precision})",
        highlight=False,
    )
    rows = [
        (
            label,
            report.fmt_value(base, kind),
            report.fmt_value(tuned, kind),
            report.fmt_diff(diff, kind),
            report.better(key, diff),
        )
        for key, label, base, tuned, diff, kind in report.metric_rows(r)
    ]
    con.print(_comparison("base vs tuned", r.base is not None, rows))
    if r.labels:
        lt = Table(title="by label", title_justify="left")
        for col in ("label", "records", "base loss", "tuned loss", "change"):
            lt.add_column(col, justify="left" if col == "label" else "right")
        for lc in r.labels:
            lt.add_row(
                lc.label,
                str(lc.records),
                report.fmt_value(lc.base_loss, "f"),
                report.fmt_value(lc.tuned_loss, "f"),
                report.fmt_diff(lc.change),
            )
        con.print(lt)
        if r.label_gap is not None:
            con.print(f"gap (change on undesirable - change on desirable): [bold]{r.label_gap:+.4f}[/]")
    if r.preference is not None:
        p = r.preference
        what = f"{p.pairs} pairs" if p.pairs else "labelled replies"
        con.print(
            f"preference (rewards = {p.beta:g} x log-likelihood change against the base, {what}): "
            f"reward accuracy [bold]{100 * p.reward_accuracy:.1f}%[/], margin [bold]{p.margin:+.4f}[/]"
        )
        for rl in p.by_label:
            con.print(
                f"  {rl.label}: {rl.replies} replies, log-likelihood {rl.mean_logp_change:+.4f} nats, "
                f"reward {rl.mean_reward:+.4f}"
            )
        for g in p.by_group:
            ch = ", ".join(f"{rl.label} {rl.mean_logp_change:+.4f} ({rl.replies})" for rl in g.by_label)
            con.print(
                f"  {p.group_by}={g.group}: {g.replies} replies, reward accuracy {100 * g.reward_accuracy:.1f}%, "
                f"margin {report.fmt_diff(g.margin)}, log-likelihood change {ch}"
            )
    if r.tools is not None:
        _render_tools(con, r.tools)
    if r.samples:
        st = Table(
            title=f"generations ({len(r.samples)} records, temperature {r.sampling.temperature:g})",
            title_justify="left",
            show_lines=True,
        )
        st.add_column("record", style="dim", max_width=18, overflow="fold")
        st.add_column("reference", overflow="fold")
        st.add_column("tuned", overflow="fold")
        if r.base:
            st.add_column("base", overflow="fold")
        for s in r.samples:
            row = [
                s.where,
                _short(s.reference),
                _short(s.tuned) + (" …" if s.tuned_finish == "length" else ""),
            ]
            if r.base:
                row.append(_short(s.base or "") + (" …" if s.base_finish == "length" else ""))
            st.add_row(*row)
        con.print(st)
    tp = r.tuned.throughput
    speed = f"scoring {tp.records_per_second:.1f} records/s"
    if tp.generation_tokens:
        speed += f"; generation {tp.generation_tokens_per_second:.1f} tok/s, prompts {tp.prompt_tokens_per_second:.0f} tok/s"
    con.print(f"[dim]{speed}; {r.seconds:.1f}s in all[/]", highlight=False)
    notes(con, r.notes)
    style = {True: "bold green", False: "bold red", None: "bold"}[r.improved]
    con.print(f"[{style}]{r.verdict}[/]", highlight=False)
    con.print(f"report: {r.report_md}\n        {r.report_json}", highlight=False)


def _render_tools(con: Console, tr: tool_eval.ToolReport) -> None:
    o = tr.overall
    heading = (
        f"tool calls ({tr.cases} assistant turns: {o.tuned.call_cases} call, {o.tuned.answer_cases} answer)"
    )
    rows = [
        (label, tool_eval.pct(base), tool_eval.pct(tuned), tool_eval.pts(diff), good)
        for _key, label, base, tuned, diff, good in tool_eval.rows(o)
    ]
    con.print(_comparison(heading, o.base is not None, rows))
    for title, table in (("label", tr.by_label), (tr.group_by, tr.by_group)):
        if not table:
            continue
        gt = Table(title=f"tool calls by {title} (base -> tuned)", title_justify="left")
        for col in ("value", "turns", "parseable calls", "tool name", "arguments exact"):
            gt.add_column(col, justify="left" if col == "value" else "right")
        for value, c in table.items():

            def pair(key: str, c: tool_eval.ToolComparison = c) -> str:
                b = tool_eval.pct(getattr(c.base, key)) if c.base else "–"
                return f"{b} -> {tool_eval.pct(getattr(c.tuned, key))}"

            gt.add_row(
                value,
                str(c.tuned.cases),
                pair("parseable_call_rate"),
                pair("tool_name_accuracy"),
                pair("arguments_exact_match"),
            )
        con.print(gt)
    notes(con, tr.notes)


_GOOD_STYLE = {True: "green", False: "red", None: ""}


def _comparison(title: str, with_base: bool, rows: list[tuple[str, str, str, str, bool | None]]) -> Table:
    """A metrics table: label, tuned (and base and the difference, green when better, with a base)."""
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    for col in ("base", "tuned", "difference") if with_base else ("tuned",):
        t.add_column(col, justify="right")
    for label, base, tuned, diff, good in rows:
        if with_base:
            t.add_row(label, base, tuned, Text(diff, style=_GOOD_STYLE[good]))
        else:
            t.add_row(label, tuned)
    return t


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


class _Bars:
    """One progress bar per stage (base: loss, base: generation, tuned: loss, ...), on stderr."""

    def __init__(self, enabled: bool):
        con = err_console()
        self.bar = (
            Progress(
                TextColumn("{task.description:<18}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=con,
            )
            if enabled
            else None
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bars:
        if self.bar is not None:
            self.bar.start()
        return self

    def update(self, p: svc.EvalProgress) -> None:
        if self.bar is None:
            return
        if p.stage not in self.tasks:
            self.tasks[p.stage] = self.bar.add_task(p.stage, total=p.total or None)
        self.bar.update(self.tasks[p.stage], completed=p.done, total=p.total or None)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


_DEFAULT = svc.EvalOptions()


def _option(name: str, *flags: str) -> Any:
    """The flag of an EvalOptions field, with its docstring as help (and its default in _DEFAULT)."""
    return field_option(svc.EvalOptions, name, *flags)


def evaluate(
    ctx: typer.Context,
    run: RunArg = None,
    checkpoint: CheckpointOpt = "best",
    dataset: Annotated[str | None, dataset_option(purpose="to evaluate on (default: the run's)")] = None,
    split: Annotated[str, _option("split", "--split")] = _DEFAULT.split,
    n_samples: Annotated[int, _option("n_samples", "--n-samples")] = _DEFAULT.n_samples,
    max_tokens: Annotated[int, _option("max_tokens", "--max-tokens")] = _DEFAULT.max_tokens,
    temperature: Annotated[float, _option("temperature", "--temperature")] = _DEFAULT.temperature,
    top_p: Annotated[float, _option("top_p", "--top-p")] = _DEFAULT.top_p,
    seed: Annotated[int, _option("seed", "--seed")] = _DEFAULT.seed,
    compare_base: Annotated[
        bool, _option("compare_base", "--compare-base/--no-compare-base")
    ] = _DEFAULT.compare_base,
    batch_size: Annotated[int | None, _option("batch_size", "--batch-size")] = _DEFAULT.batch_size,
    limit: Annotated[int | None, _option("limit", "--limit")] = _DEFAULT.limit,
    tool_cases: Annotated[int, _option("tool_cases", "--tool-cases")] = _DEFAULT.tool_cases,
    group_by: Annotated[str | None, _option("group_by", "--group-by")] = _DEFAULT.group_by,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a checkpoint against its base model: loss, perplexity, accuracy, sample generations,
    and tool-call metrics when the split's replies call tools (docs/tools.md).

    Writes runs/<id>/eval/<checkpoint>-<split>/report.json and report.md and records the evaluation
    in the workspace registry (table evaluations).
    """
    ws = get_workspace(ctx)
    with _Bars(enabled=not as_json and err_console().is_terminal) as bars:
        result = svc.evaluate(ws, **command_args(ctx, "as_json"), progress=bars.update)
    emit(result, as_json, _render)
