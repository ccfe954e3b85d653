"""`ft train` (stub until issue #5 lands)."""

from __future__ import annotations

from typing import Annotated

import typer

from ft.cli.common import not_built


def train(args: Annotated[list[str] | None, typer.Argument(hidden=True)] = None) -> None:
    """Not built yet (issue #5)."""
    not_built("train", 5)
