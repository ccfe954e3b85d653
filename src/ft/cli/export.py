"""`ft export` (stub until issue #8 lands)."""

from __future__ import annotations

from ft.cli.common import not_built


def export() -> None:
    """Not built yet (issue #8)."""
    not_built("export", 8)
