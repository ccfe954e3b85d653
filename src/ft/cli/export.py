"""`ft export` (stub until issue #8 lands)."""

from __future__ import annotations

from typing import Annotated

import typer

from ft.cli.common import not_built


def export(args: Annotated[list[str] | None, typer.Argument(hidden=True)] = None) -> None:
    """Not built yet (issue #8)."""
    not_built("export", 8)
