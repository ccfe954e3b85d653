"""`ft evaluate` (stub until issue #7 lands)."""

from __future__ import annotations

from ft.cli.common import not_built


def evaluate() -> None:
    """Not built yet (issue #7)."""
    not_built("evaluate", 7)
