"""`ft runs list | show | plot`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ft.cli.common import emit, get_workspace
from ft.cli.options import JsonOpt, RunArg
from ft.services import runs as svc

app = typer.Typer(no_args_is_help=True)

_STATUS_STYLE = {
    "completed": "green",
    "running": "cyan",
    "failed": "red",
    "interrupted": "yellow",
    "stopped": "yellow",
    "early-stopped": "green",
    "pruned": "magenta",
}


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _render_list(con: Console, r: svc.RunList) -> None:
    if not r.runs:
        con.print("no runs yet: ft train")
        return
    t = Table(title="runs", title_justify="left")
    for col in ("id", "status", "model", "dataset", "method", "steps", "best val loss", "time"):
        t.add_column(col, no_wrap=col in ("id", "status", "steps"))
    for s in r.runs:
        steps = f"{s.step or 0}/{s.total_steps or '?'}"
        best = f"{_loss(s.best_val_loss)}" + (f" @{s.best_step}" if s.best_step is not None else "")
        style = _STATUS_STYLE.get(s.status, "")
        t.add_row(
            s.id,
            f"[{style}]{s.status}[/]" if style else s.status,
            s.model or "-",
            s.dataset or "-",
            s.method or "-",
            steps,
            best,
            f"{s.train_seconds:.0f}s" if s.train_seconds else "-",
        )
    con.print(t, soft_wrap=False)


def _render_show(con: Console, r: svc.RunDetail) -> None:
    s = r.summary
    con.print(f"run [bold]{s.id}[/] ({s.status}), created {s.created_at}")
    if s.detail:
        con.print(f"[yellow]{s.detail}[/]", highlight=False)
    t = Table(show_header=False)
    t.add_column("", style="bold")
    t.add_column("", overflow="fold")
    m = r.meta
    t.add_row("model / dataset", f"{s.model} / {s.dataset} v{m.dataset_version or '?'}")
    t.add_row(
        "method",
        f"{s.method}, {m.trainable_parameters:,} trainable parameters"
        if m.trainable_parameters is not None
        else str(s.method),
    )
    t.add_row(
        "progress",
        f"step {s.step}/{s.total_steps}, {m.tokens or 0:,} tokens, {m.tokens_per_second or '-'} tokens/s",
    )
    if m.first_val_loss is not None:
        t.add_row(
            "validation loss",
            f"{_loss(m.first_val_loss)} -> {_loss(m.final_val_loss)} "
            f"(best {_loss(s.best_val_loss)} at step {s.best_step})",
        )
    if m.stop_reason and m.stop_reason != "completed":
        t.add_row("stopped", m.stop_reason + (f": {m.error}" if m.error else ""))
    if m.skipped_steps:
        t.add_row(
            "skipped steps", f"{m.skipped_steps} (non-finite loss or gradient; record ids in train.log)"
        )
    for rs in m.resumes:
        forced = f", forced: {'; '.join(rs.forced_differences)}" if rs.forced_differences else ""
        t.add_row("resumed", f"{rs.at} from {rs.from_ or 'step 0'}{forced}")
    t.add_row("checkpoints", ", ".join(r.checkpoints) or "-")
    t.add_row("best / latest", f"{r.best_checkpoint or '-'} / {r.latest_checkpoint or '-'}")
    for k, v in r.files.items():
        t.add_row(k, v)
    con.print(t, soft_wrap=False)
    if r.evals:
        e = Table(title="evaluations", title_justify="left")
        for col in ("step", "val loss", "perplexity", ""):
            e.add_column(col)
        for row in r.evals:
            e.add_row(
                str(row["step"]),
                _loss(row["val_loss"]),
                f"{row['val_ppl']:.2f}",
                "best" if row["is_best"] else "",
            )
        con.print(e, soft_wrap=False)
    if r.reports:
        rep = Table(title="ft evaluate reports", title_justify="left")
        for col in ("checkpoint", "split", "records", "base loss", "tuned loss", "report"):
            rep.add_column(col, overflow="fold")
        for ev in r.reports:
            rep.add_row(
                ev.checkpoint,
                ev.split,
                str(ev.records or "-"),
                _loss(ev.base_loss),
                _loss(ev.tuned_loss),
                ev.path or "-",
            )
        con.print(rep, soft_wrap=False)
    for w in m.warnings:
        con.print(f"[yellow]warning:[/] {w}", highlight=False)


@app.command("list")
def list_(
    ctx: typer.Context,
    study: Annotated[
        str | None, typer.Option("--study", help="Only the trials of this `ft tune` study.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Training runs with their status and best validation loss."""
    emit(svc.list_runs(get_workspace(ctx), study), as_json, _render_list)


@app.command("show")
def show(ctx: typer.Context, run: RunArg = None, as_json: JsonOpt = False) -> None:
    """Details of one run: settings, progress, evaluations, checkpoints and files."""
    emit(svc.show_run(get_workspace(ctx), run), as_json, _render_show)


@app.command("plot")
def plot(
    ctx: typer.Context,
    run: RunArg = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="PNG to write (default: runs/<id>/loss.png).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw the loss and learning-rate curves of a run (also while it trains)."""
    emit(
        svc.plot_run(get_workspace(ctx), run, out),
        as_json,
        lambda con, r: con.print(
            f"wrote {r.path} ({r.train_points} training points, {r.eval_points} evaluations)"
        ),
    )
