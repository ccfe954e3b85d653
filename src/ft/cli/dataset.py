"""`ft dataset` (stub until issue #4 lands)."""

from __future__ import annotations

import typer

from ft.cli.common import not_built

app = typer.Typer()


@app.callback(invoke_without_command=True)
def _stub() -> None:
    not_built("dataset", 4)
