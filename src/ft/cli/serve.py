"""`ft serve` (stub until issue #9 lands)."""

from __future__ import annotations

from typing import Annotated

import typer

from ft.cli.common import not_built


def serve(args: Annotated[list[str] | None, typer.Argument(hidden=True)] = None) -> None:
    """Not built yet (issue #9)."""
    not_built("serve", 9)
