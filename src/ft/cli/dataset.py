"""`ft dataset` (stub until issue #4 lands)."""

from __future__ import annotations

from ft.cli.common import stub_app

app = stub_app("dataset", 4, ["prepare", "list", "info", "show", "rm"])
