"""The tool definitions of a prepared dataset's records: ``tools.jsonl`` beside the splits.

`ft evaluate` checks generated calls against the definitions of the record they were generated for
(JSON-schema validity), so prepare keeps them. Records of one dataset mostly share one list, so each
distinct list is written once: a line ``{"set": K, "tools": [...]}`` the first time list ``K`` is seen,
then ``{"record_id": ID, "set": K}`` for every kept record that has definitions (its own or ``--tools``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

TOOLS_FILE = "tools.jsonl"


class ToolSetWriter:
    """Writes ``tools.jsonl`` in ``folder`` as records come (the file is created at the first one)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / TOOLS_FILE
        self._fh: IO[str] | None = None
        self._sets: dict[str, int] = {}

    def add(self, record_id: int, tools: Sequence[Any] | None) -> None:
        if not tools:
            return
        if self._fh is None:
            self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        key = json.dumps(list(tools), ensure_ascii=False, sort_keys=True)
        k = self._sets.get(key)
        if k is None:
            k = self._sets[key] = len(self._sets)
            self._fh.write(json.dumps({"set": k, "tools": list(tools)}, ensure_ascii=False) + "\n")
        self._fh.write(json.dumps({"record_id": int(record_id), "set": k}) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_record_tools(folder: Path) -> dict[int, list[Any]] | None:
    """``{record id: tool definitions}`` of a prepared dataset (None when it stores none: prepared by an
    older ft, or no record has definitions)."""
    path = Path(folder) / TOOLS_FILE
    if not path.is_file():
        return None
    sets: dict[int, list[Any]] = {}
    out: dict[int, list[Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if "tools" in row:
                sets[int(row["set"])] = row["tools"]
            else:
                out[int(row["record_id"])] = sets[int(row["set"])]
    return out
