"""`ft tune`: a Bayesian hyperparameter search over real training runs (see ft.services.tune)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ft.cli.common import emit, err_console, get_workspace, notes
from ft.cli.options import ConfigOpt, JsonOpt, SetOpt, command_args, dataset_option, setting
from ft.services import tune as svc


def _value(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _params(p: dict[str, Any]) -> str:
    return ", ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in p.items()
    )


_STYLE = {"completed": "green", "pruned": "magenta", "failed": "red", "interrupted": "yellow"}


def _render(con: Console, r: svc.TuneResult) -> None:
    t = Table(title=f"study {r.study}: {r.objective} ({r.direction})", title_justify="left")
    for col in ("trial", "status", "value", "params", "run", "time"):
        t.add_column(col, overflow="fold", no_wrap=col in ("trial", "status"))
    for row in r.trials:
        style = _STYLE.get(row.status, "")
        status = row.status + (f" @{row.pruned_at_step}" if row.pruned_at_step is not None else "")
        t.add_row(
            str(row.number),
            f"[{style}]{status}[/]" if style else status,
            _value(row.value),
            _params(row.params),
            row.run_id or "-",
            f"{row.seconds:.0f}s" if row.seconds is not None else "-",
        )
    con.print(t, soft_wrap=False)
    notes(con, r.notes)
    counts = {
        s: sum(x.status == s for x in r.trials) for s in ("completed", "pruned", "failed", "interrupted")
    }
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    con.print(f"{len(r.trials)} trials ({summary}) in {r.total_seconds:.0f}s; stopped: {r.stopped}")
    if r.best is None:
        con.print("no trial finished with a value yet")
        return
    con.print(
        f"[bold green]best[/]: trial {r.best.number} ({r.best.run_id}) {r.objective} {_value(r.best.value)} "
        f"with {_params(r.best.params)}",
        highlight=False,
    )
    con.print(f"best configuration: {r.best_config}")
    if r.plots:
        con.print("plots: " + ", ".join(r.plots))
    con.print(f"next: ft train --config {r.best_config}   |   ft runs list --study {r.study}")


class _Progress:
    def __init__(self, enabled: bool):
        self.con = err_console()
        self.enabled = enabled

    def __call__(self, p: svc.TuneProgress) -> None:
        if not self.enabled:
            return
        if p.kind == "start":
            self.con.print(
                f"trial {p.trial.number} ({p.done}/{p.budget} done): {_params(p.trial.params)}",
                highlight=False,
            )
        else:
            extra = f" at step {p.trial.pruned_at_step}" if p.trial.pruned_at_step is not None else ""
            err = f": {p.trial.error}" if p.trial.error else ""
            self.con.print(
                f"trial {p.trial.number} {p.trial.status}{extra}, value {_value(p.trial.value)}{err}",
                highlight=False,
            )

    def note(self, text: str) -> None:
        notes(self.con, [text])


def tune(
    ctx: typer.Context,
    trials: Annotated[int | None, setting("tune.trials", "--trials", min=1)] = None,
    timeout: Annotated[str | None, setting("tune.timeout", "--timeout")] = None,
    objective: Annotated[str | None, setting("tune.objective", "--objective")] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Name of a new study.")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Continue the study of this name.")] = None,
    dataset: Annotated[str | None, dataset_option("-d")] = None,
    allow_concurrent: Annotated[
        bool, typer.Option("--allow-concurrent", help="Run beside another study of this workspace.")
    ] = False,
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search learning rate, LoRA rank/alpha/dropout, warmup (or tune.space) with real, prunable runs."""
    ws = get_workspace(ctx)
    show = _Progress(enabled=not as_json)
    result = svc.tune(ws, **command_args(ctx, "as_json"), progress=show, on_note=show.note)
    emit(result, as_json, _render)
