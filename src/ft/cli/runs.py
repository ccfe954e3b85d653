"""`ft runs` (stub until issue #5 lands)."""

from __future__ import annotations

from ft.cli.common import stub_app

app = stub_app("runs", 5, ["list", "show", "plot"])
