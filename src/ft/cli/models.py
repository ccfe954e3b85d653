"""`ft models` (stub until issue #3 lands)."""

from __future__ import annotations

import typer

from ft.cli.common import not_built

app = typer.Typer()


@app.callback(invoke_without_command=True)
def _stub() -> None:
    not_built("models", 3)
