"""`ft models` (stub until issue #3 lands)."""

from __future__ import annotations

from ft.cli.common import stub_app

app = stub_app("models", 3, ["list", "pull", "info", "rm"])
