"""`ft serve` (stub until issue #9 lands)."""

from __future__ import annotations

from ft.cli.common import not_built


def serve() -> None:
    """Not built yet (issue #9)."""
    not_built("serve", 9)
