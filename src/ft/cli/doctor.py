"""`ft doctor`: is this machine ready to train?"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ft.cli.common import emit, state
from ft.cli.options import JsonOpt
from ft.services import project

_ICON = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}


def _render(con: Console, r: project.DoctorReport) -> None:
    table = Table(title="ft doctor")
    for col in ("check", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    for c in r.checks:
        table.add_row(c.name, _ICON[c.status], c.detail, c.fix or "")
    con.print(table)
    con.print("[green]ready[/]" if r.ok else "[red]problems found: see the fix column[/]")


def doctor(
    ctx: typer.Context,
    measure: Annotated[
        bool, typer.Option("--measure/--no-measure", help="Time a matmul on this machine.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Check MLX, the device, BLAS speed, memory, disk and the workspace; exit 1 when something is broken."""
    report = project.doctor(state(ctx).workspace, measure=measure)
    emit(report, as_json, _render)
    if not report.ok:
        raise typer.Exit(1)
