"""The workspace registry: one sqlite file (ft.db) recording models, datasets, runs, evaluations, exports.

Each table has its key columns, a few indexed columns, a JSON ``meta`` column for everything else,
and ``created_at``/``updated_at`` timestamps (UTC ISO-8601). Services own what goes into ``meta``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# table -> (key columns, extra indexed columns)
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "models": (("name",), ("source",)),
    "datasets": (("name", "version"), ("source",)),
    "runs": (("id",), ("name", "status")),
    "evaluations": (("id",), ("run_id",)),
    "exports": (("id",), ("run_id",)),
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """Small typed-by-convention access to ft.db; every call opens a short transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._ensure_schema()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # timeout: a second ft process (e.g. `ft runs list` during training) waits instead of failing.
        conn = sqlite3.connect(self.path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def _ensure_schema(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as c:
            c.execute("PRAGMA journal_mode=WAL")
            for table, (keys, extra) in TABLES.items():
                cols = [f"{k} TEXT NOT NULL" for k in keys] + [f"{e} TEXT" for e in extra]
                cols += [
                    "meta TEXT NOT NULL DEFAULT '{}'",
                    "created_at TEXT NOT NULL",
                    "updated_at TEXT NOT NULL",
                ]
                c.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)}, PRIMARY KEY ({', '.join(keys)}))"
                )
                for e in extra:
                    c.execute(f"CREATE INDEX IF NOT EXISTS idx_{table}_{e} ON {table}({e})")
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @staticmethod
    def _check(table: str, columns: list[str]) -> None:
        if table not in TABLES:
            raise KeyError(f"unknown registry table {table!r}")
        keys, extra = TABLES[table]
        allowed = set(keys) | set(extra) | {"meta"}
        bad = [c for c in columns if c not in allowed]
        if bad:
            raise KeyError(f"unknown column(s) {bad} for registry table {table!r}")

    def upsert(
        self, table: str, key: dict[str, Any], meta: dict[str, Any] | None = None, **fields: Any
    ) -> None:
        """Insert or update one row; ``meta`` replaces the stored JSON when given."""
        self._check(table, [*key, *fields])
        now = _now()
        values = {
            **{k: str(v) for k, v in key.items()},
            **{k: (None if v is None else str(v)) for k, v in fields.items()},
        }
        if meta is not None:
            values["meta"] = json.dumps(meta, sort_keys=True, default=str)
        cols = list(values)
        updates = (
            ", ".join(f"{c}=excluded.{c}" for c in cols if c not in key) or "updated_at=excluded.updated_at"
        )
        with self._connect() as c:
            c.execute(
                f"INSERT INTO {table} ({', '.join(cols)}, created_at, updated_at) "
                f"VALUES ({', '.join('?' for _ in cols)}, ?, ?) "
                f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}, updated_at=excluded.updated_at",
                [*values.values(), now, now],
            )

    def _row(self, row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        d["meta"] = json.loads(d.get("meta") or "{}")
        return d

    def get(self, table: str, **key: Any) -> dict[str, Any] | None:
        self._check(table, list(key))
        where = " AND ".join(f"{k}=?" for k in key)
        with self._connect() as c:
            row = c.execute(f"SELECT * FROM {table} WHERE {where}", [str(v) for v in key.values()]).fetchone()
        return self._row(row) if row else None

    def list(self, table: str, **filters: Any) -> list[dict[str, Any]]:
        """Rows, oldest first; ``filters`` match columns exactly."""
        self._check(table, list(filters))
        where = (" WHERE " + " AND ".join(f"{k}=?" for k in filters)) if filters else ""
        with self._connect() as c:
            rows = c.execute(
                f"SELECT * FROM {table}{where} ORDER BY created_at, rowid", [str(v) for v in filters.values()]
            ).fetchall()
        return [self._row(r) for r in rows]

    def delete(self, table: str, **key: Any) -> bool:
        self._check(table, list(key))
        where = " AND ".join(f"{k}=?" for k in key)
        with self._connect() as c:
            cur = c.execute(f"DELETE FROM {table} WHERE {where}", [str(v) for v in key.values()])
        return cur.rowcount > 0

    def check(self) -> str | None:
        """None when the database is readable and intact, else sqlite's complaint."""
        try:
            with self._connect() as c:
                res = c.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            return str(e)
        return None if res == "ok" else res
