"""`ft train` (stub until issue #5 lands)."""

from __future__ import annotations

from ft.cli.common import not_built


def train() -> None:
    """Not built yet (issue #5)."""
    not_built("train", 5)
