"""`ft evaluate` (stub until issue #7 lands)."""

from __future__ import annotations

from typing import Annotated

import typer

from ft.cli.common import not_built


def evaluate(args: Annotated[list[str] | None, typer.Argument(hidden=True)] = None) -> None:
    """Not built yet (issue #7)."""
    not_built("evaluate", 7)
