"""`ft dataset prepare|list|info|show|rm`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ft.cli.common import confirm_delete, emit, err_console, fields_table, get_workspace, notes
from ft.cli.options import JsonOpt, NameOpt, SetOpt, YesOpt, command_args, setting
from ft.services import dataset_inspect as inspect_svc
from ft.services import dataset_prepare as prepare_svc
from ft.services import datasets as svc

app = typer.Typer(no_args_is_help=True)

VersionOpt = Annotated[
    int | None, typer.Option("--version", "-v", help="Dataset version (default: the latest).")
]
DatasetArg = Annotated[str, typer.Argument(help="Dataset NAME (or NAME@vN for one version).")]
BAR_WIDTH = 40


# ------------------------------------------------------------------------------------------ render
def _stats_table(s: prepare_svc.DatasetStats, title: str) -> Table:
    bad_style = "red" if s.bad_fraction > s.max_bad else ("yellow" if s.bad else "green")
    lf, lens = s.labels_found, s.lengths
    shown_groups = list(s.groups.items())[:12]
    more_groups = f", ... ({len(s.groups)} values)" if len(s.groups) > len(shown_groups) else ""
    rows: list[tuple[str, RenderableType | None]] = [
        (
            "records read",
            f"{s.records_read:,}" + (f" ({s.blank_lines} blank lines skipped)" if s.blank_lines else ""),
        ),
        ("kept", f"{s.kept:,}"),
        *(
            (
                f"  {split}",
                f"{st.records:,} records, {st.tokens:,} tokens ({st.trained_tokens:,} trained)"
                + (f", desirable ratio {st.desirable_ratio:.2f}" if st.desirable_ratio is not None else ""),
            )
            for split, st in s.splits.items()
        ),
        ("invalid", Text(f"{s.bad:,} ({s.bad_fraction:.1%}; limit {s.max_bad:.1%})", style=bad_style)),
        *((f"  {reason}", f"{count:,}") for reason, count in s.rejected.items()),
        ("undesirable skipped", f"{s.skipped_undesirable:,}" if s.skipped_undesirable else None),
        ("truncated", f"{s.truncated:,} (to {s.max_seq_length} tokens)" if s.truncated else None),
        (
            "labels found",
            f"{lf.get('desirable', 0):,} desirable, {lf.get('undesirable', 0):,} undesirable, "
            f"{lf.get('unlabelled', 0):,} unlabelled (policy: {s.label_policy})",
        ),
        ("formats", ", ".join(f"{k} {v:,}" for k, v in s.formats.items()) or "-"),
        ("turns per record", f"min {s.turns.min}, mean {s.turns.mean}, max {s.turns.max}"),
        (
            "tokens per record",
            f"min {lens.min}, p50 {lens.p50}, p90 {lens.p90}, p99 {lens.p99}, max {lens.max}"
            f" (max_seq_length {s.max_seq_length}, over-length: {s.on_long})",
        ),
        ("trainable tokens", f"{s.trainable_tokens:,} (train split)"),
        ("split", s.split_method or None),
        (
            f"groups ({s.group_by})",
            ", ".join(f"{k} {v:,}" for k, v in shown_groups) + more_groups if s.group_by else None,
        ),
        (
            "conflicting labels",
            Text(f"{s.conflicting_labels:,} (later copies left out)", style="yellow")
            if s.conflicting_labels
            else None,
        ),
        (
            "contamination",
            "none: no prompt appears in two splits"
            if s.shared_prompts == 0
            else Text(f"{s.shared_prompts} prompts appear in two splits", style="red"),
        ),
        (
            "steps per epoch",
            f"{s.steps_per_epoch:,} (batch {s.batch_size} x accumulation "
            f"{s.grad_accumulation_steps} from train.yml)"
            if s.steps_per_epoch is not None
            else None,
        ),
    ]
    return fields_table(rows, title, value_header="value")


def _histogram(s: prepare_svc.DatasetStats) -> Text:
    h = s.histogram
    out = Text("token lengths\n", style="bold")
    if not h.counts:
        return out
    top = max(h.counts) or 1
    width = len(str(h.edges[-1]))
    for lo, hi, c in zip(h.edges, h.edges[1:], h.counts, strict=False):
        bar = "█" * max(1 if c else 0, round(BAR_WIDTH * c / top))
        out.append(f"{lo:>{width}}-{hi - 1:<{width}} ")
        out.append(bar, style="cyan")
        out.append(f" {c:,}\n")
    return out


def _render_prepare(con: Console, r: prepare_svc.DatasetResult) -> None:
    head = "cache hit: already prepared" if r.cache_hit else "prepared"
    con.print(
        f"[bold green]{head}[/] dataset [bold]{r.name}[/] v{r.version} from {r.source} "
        f"(model {r.model}, template {r.template})"
    )
    con.print(_stats_table(r.stats, f"{r.name} v{r.version}"), soft_wrap=False)
    con.print(f"[bold]{r.stats.label_note}[/]", highlight=False)
    if r.stats.split_method.startswith("as given"):
        con.print(f"splits kept {r.stats.split_method} (--val/--test not applied)", highlight=False)
    con.print(_histogram(r.stats))
    for ex in r.stats.rejected_examples:
        con.print(f"  [yellow]{ex.reason}[/] {ex.where}: {ex.message}", highlight=False)
    notes(con, r.warnings, "warning")
    notes(con, r.notes, style="bold yellow")
    con.print(
        f"files: {r.path}  (rejected records: {Path(r.rejected_file).name}"
        + (f", length plot: {Path(r.plot_file).name}" if r.plot_file else "")
        + ")"
    )
    con.print(f"\nNext: [bold]ft train --dataset {r.ref or r.name}[/]")


def _render_list(con: Console, r: inspect_svc.DatasetList) -> None:
    if not r.datasets:
        con.print("no datasets yet: ft dataset prepare SOURCE")
        return
    t = Table(title="Datasets")
    for col in ("name", "version", "created", "train", "val", "test", "model", "source"):
        t.add_column(col)
    for d in r.datasets:
        t.add_row(
            d.name,
            str(d.version),
            d.created_at,
            *(f"{d.records.get(s, 0):,}" for s in svc.SPLITS),
            d.model,
            d.source,
        )
    con.print(t)


def _render_info(con: Console, r: inspect_svc.DatasetInfo) -> None:
    m, s = r.manifest, r.summary
    con.print(f"[bold]{s.name}[/] v{s.version} (versions: {', '.join(map(str, r.versions))}) at {s.path}")
    con.print(
        f"source {m.get('source')} · format {m.get('format')} · template {m.get('template', {}).get('name')} · "
        f"model {m.get('tokenizer', {}).get('model')} · created {m.get('created_at')}"
    )
    for src in m.get("sources", []):
        con.print(
            f"  {src.get('display') or src.get('path')}  sha256 {str(src.get('sha256', src.get('fingerprint')))[:16]}…"
        )
    con.print(_stats_table(r.stats, "statistics"), soft_wrap=False)
    con.print(_histogram(r.stats))


def _render_show(con: Console, r: inspect_svc.ShowResult) -> None:
    con.print(
        f"[bold]{r.name}[/] v{r.version} · {r.split} · {r.total:,} records · "
        "[black on green]trained tokens[/] / [dim]context[/]"
    )
    for rec in r.records:
        body = Text()
        for seg in rec.segments:
            body.append(seg.text, style="black on green" if seg.trained else "dim")
        label = {1: "desirable", 0: "undesirable"}.get(rec.label, "unlabelled")
        title = f"#{rec.index} · {rec.where} · {label} · {rec.tokens} tokens, {rec.trained_tokens} trained"
        con.print(Panel(Group(body), title=title, title_align="left"), soft_wrap=False)


# ---------------------------------------------------------------------------------------- commands
@app.command("prepare")
def prepare(
    ctx: typer.Context,
    source: Annotated[
        str | None,
        typer.Argument(
            help="JSONL/JSON/CSV/Parquet file, a folder of them, or hf:ID for a Hugging Face dataset "
            "(default: train.yml data.path)."
        ),
    ] = None,
    name: NameOpt = None,
    format: Annotated[str | None, setting("data.format", "--format", "-f")] = None,
    template: Annotated[str | None, setting("data.template", "--template", "-t")] = None,
    max_bad: Annotated[str | None, setting("data.max_bad", "--max-bad", more=" Given as 0.05 or 5%.")] = None,
    labels: Annotated[str | None, setting("data.labels", "--labels")] = None,
    val_split: Annotated[float | None, setting("data.val_split", "--val", more=" 0 = none.")] = None,
    test_split: Annotated[float | None, setting("data.test_split", "--test")] = None,
    train_on: Annotated[str | None, setting("data.train_on", "--train-on")] = None,
    max_seq_length: Annotated[int | None, setting("data.max_seq_length", "--max-seq-length")] = None,
    on_long: Annotated[str | None, setting("data.on_long", "--on-long")] = None,
    show_content: Annotated[
        bool,
        typer.Option("--show-content", help="Also write each rejected record's content to rejected.jsonl."),
    ] = False,
    model: Annotated[
        str | None, setting("model.name", "--model", "-m", more=" Its tokenizer and chat template are used.")
    ] = None,
    hf_split: Annotated[
        str | None,
        typer.Option(
            "--hf-split",
            help="Split of a Hugging Face dataset (default: train; a saved DatasetDict: all its splits, kept as given).",
        ),
    ] = None,
    hf_config: Annotated[
        str | None, typer.Option("--hf-config", help="Configuration of a Hugging Face dataset.")
    ] = None,
    tools: Annotated[
        str | None,
        typer.Option(
            "--tools",
            help="JSON file of tool definitions for records without their own 'tools' (default: train.yml's "
            "data.tools, relative to the workspace).",
        ),
    ] = None,
    unknown_tool: Annotated[str | None, setting("data.unknown_tool", "--unknown-tool")] = None,
    stratify_by: Annotated[str | None, setting("data.stratify_by", "--stratify-by")] = None,
    group_by: Annotated[str | None, setting("data.group_by", "--group-by")] = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate, template, tokenize and split SOURCE; print statistics. Options default to train.yml's data section."""
    ws = get_workspace(ctx)
    args = command_args(ctx, "as_json")
    data = {key: args.pop(key) for key in prepare_svc.DATA_OPTIONS}  # train.yml's data section, by key
    with _progress_bar(enabled=not as_json) as report:
        result = prepare_svc.prepare_dataset(ws, **args, data=data, progress=report)
    emit(result, as_json, _render_prepare)


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Prepared datasets and their versions."""
    emit(inspect_svc.list_datasets(get_workspace(ctx)), as_json, _render_list)


@app.command("info")
def info(
    ctx: typer.Context,
    name: DatasetArg,
    version: VersionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Manifest and statistics of a prepared dataset."""
    emit(inspect_svc.dataset_info(get_workspace(ctx), name, version), as_json, _render_info)


@app.command("show")
def show(
    ctx: typer.Context,
    name: DatasetArg,
    split: Annotated[str, typer.Option("--split", "-s", help="train, val or test.")] = "train",
    n: Annotated[int, typer.Option("--n", help="How many records.")] = 3,
    start: Annotated[int, typer.Option("--start", help="Index of the first record.")] = 0,
    version: VersionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Records as the model sees them, with the trained tokens highlighted."""
    emit(inspect_svc.show_dataset(get_workspace(ctx), name, split, n, start, version), as_json, _render_show)


@app.command("rm")
def rm(
    ctx: typer.Context,
    name: DatasetArg,
    version: VersionOpt = None,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a prepared dataset (one version with --version, else every version)."""
    ws = get_workspace(ctx)
    what = (
        f"{name} v{version}" if version is not None else (name if "@" in name else f"every version of {name}")
    )
    confirm_delete(what, yes, as_json)
    emit(svc.remove_dataset(ws, name, version), as_json, _render_rm)


def _render_rm(con: Console, r: svc.RemoveResult) -> None:
    if r.removed_versions:
        con.print(f"removed {r.name} version(s) {', '.join(map(str, r.removed_versions))}")
    if r.removed_leftovers:
        con.print(f"removed what failed prepares of {r.name} left: {', '.join(r.removed_leftovers)}")


class _progress_bar:  # noqa: N801 - used as a context manager, reads like a function
    """A byte-based progress bar on stderr while preparing (nothing for --json or when not a terminal)."""

    def __init__(self, enabled: bool):
        con = err_console()
        self.enabled = enabled and con.is_terminal
        self.bar = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[recs]}"),
                TimeRemainingColumn(),
                console=con,
                transient=True,
            )
            if self.enabled
            else None
        )
        self.task: Any = None

    def __enter__(self):  # noqa: ANN204
        if self.bar is None:
            return None
        self.bar.start()
        self.task = self.bar.add_task("reading", total=None, recs="")
        return self._update

    def _update(self, p) -> None:  # noqa: ANN001
        assert self.bar is not None and self.task is not None
        self.bar.update(
            self.task,
            description=p.stage,
            total=p.bytes_total or None,
            completed=p.bytes_done,
            recs=f"{p.records:,} records, {p.kept:,} kept",
        )

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        if self.bar is not None:
            self.bar.stop()
