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

from ft.cli.common import JsonOpt, emit, err_console, get_workspace
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
    t = Table(title="base vs tuned", title_justify="left")
    t.add_column("metric")
    if r.base:
        t.add_column("base", justify="right")
    t.add_column("tuned", justify="right")
    if r.base:
        t.add_column("difference", justify="right")
    for key, label, base, tuned, diff, kind in report.metric_rows(r):
        cells: list[str | Text] = [label]
        if r.base:
            cells.append(report.fmt_value(base, kind))
        cells.append(report.fmt_value(tuned, kind))
        if r.base:
            good = report.better(key, diff)
            cells.append(
                Text(report.fmt_diff(diff, kind), style={True: "green", False: "red", None: ""}[good])
            )
        t.add_row(*cells)
    con.print(t)
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
    for n in r.notes:
        con.print(f"[yellow]note:[/] {n}", highlight=False)
    style = {True: "bold green", False: "bold red", None: "bold"}[r.improved]
    con.print(f"[{style}]{r.verdict}[/]", highlight=False)
    con.print(f"report: {r.report_md}\n        {r.report_json}", highlight=False)


def _render_tools(con: Console, tr: tool_eval.ToolReport) -> None:
    o = tr.overall
    t = Table(
        title=f"tool calls ({tr.cases} assistant turns: {o.tuned.call_cases} call, {o.tuned.answer_cases} answer)",
        title_justify="left",
    )
    t.add_column("metric")
    if o.base:
        t.add_column("base", justify="right")
    t.add_column("tuned", justify="right")
    if o.base:
        t.add_column("difference", justify="right")
    for _key, label, base, tuned, diff, good in tool_eval.rows(o):
        cells: list[str | Text] = [label]
        if o.base:
            cells.append(tool_eval.pct(base))
        cells.append(tool_eval.pct(tuned))
        if o.base:
            cells.append(Text(tool_eval.pts(diff), style={True: "green", False: "red", None: ""}[good]))
        t.add_row(*cells)
    con.print(t)
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
    for n in tr.notes:
        con.print(f"[yellow]note:[/] {n}", highlight=False)


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


def evaluate(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(help="Run id or name (default: the most recent run).")] = None,
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="best | latest | step-N | path of a checkpoint folder.")
    ] = "best",
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset", help="Prepared dataset NAME (or NAME@vN) to evaluate on (default: the run's)."
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="val | test (or train).")] = "val",
    n_samples: Annotated[
        int, typer.Option("--n-samples", help="Records to generate replies for (0 = none).")
    ] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens per generated reply.")] = 256,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy.")
    ] = 0.0,
    top_p: Annotated[
        float,
        typer.Option(
            "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this much probability."
        ),
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling (and for the --limit subset).")] = 0,
    compare_base: Annotated[
        bool,
        typer.Option(
            "--compare-base/--no-compare-base", help="Also evaluate the base model on the same records."
        ),
    ] = True,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Records per forward pass / replies generated together (default: the run's training.batch_size).",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Score a fixed seeded subset of this many records.")
    ] = None,
    tool_cases: Annotated[
        int,
        typer.Option(
            "--tool-cases",
            help="When replies call tools: assistant turns to generate and score tool calls for (0 = none).",
        ),
    ] = 64,
    group_by: Annotated[
        str | None,
        typer.Option("--group-by", help="Also report tool-call metrics per value of this record key."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a checkpoint against its base model: loss, perplexity, accuracy, sample generations,
    and tool-call metrics when the split's replies call tools (docs/tools.md).

    Writes runs/<id>/eval/<checkpoint>-<split>/report.json and report.md and records the evaluation
    in the workspace registry (table evaluations).
    """
    ws = get_workspace(ctx)
    with _Bars(enabled=not as_json and err_console().is_terminal) as bars:
        result = svc.evaluate(
            ws,
            run=run,
            checkpoint=checkpoint,
            dataset=dataset,
            split=split,
            n_samples=n_samples,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            compare_base=compare_base,
            batch_size=batch_size,
            limit=limit,
            tool_cases=tool_cases,
            group_by=group_by,
            progress=bars.update,
        )
    emit(result, as_json, _render)
