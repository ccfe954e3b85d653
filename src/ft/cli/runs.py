"""`ft runs` (stub until issue #5 lands)."""

from __future__ import annotations

import typer

from ft.cli.common import not_built

app = typer.Typer()


@app.callback(invoke_without_command=True)
def _stub() -> None:
    not_built("runs", 5)
