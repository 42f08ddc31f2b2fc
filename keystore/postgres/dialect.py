"""psycopg behind the few aiosqlite calls the shared repository logic makes.

The repository logic (keystore/sqlite/repository.py and principals.py) is written against
`db.execute(sql, params)` returning a cursor (awaitable, or an async context manager) with
`fetchone`, `fetchall`, `rowcount` and `lastrowid`, and SQLite's `?` placeholders. This
module gives a psycopg AsyncConnection that shape and rewrites the handful of statements
whose SQL differs, so both backends run one implementation of every rule (positions,
compare-and-set, lockout, audit rows) instead of two that drift apart.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import psycopg

#: SQLite statements that PostgreSQL spells differently (after `?` became `%s`).
_REWRITE = {
    "INSERT OR REPLACE INTO erase_permissions VALUES (%s, %s, %s, %s)": (
        "INSERT INTO erase_permissions VALUES (%s, %s, %s, %s) ON CONFLICT (vm_uuid) DO UPDATE "
        "SET deep_erase = EXCLUDED.deep_erase, normal_delete = EXCLUDED.normal_delete, "
        "updated = EXCLUDED.updated"
    ),
}

#: Inserts whose new id the logic reads back through `cursor.lastrowid`.
_RETURNING_ID = ("INSERT INTO usb_rules ", "INSERT INTO disks ")


def to_pg(sql: str) -> tuple[str, bool]:
    """(PostgreSQL text of `sql`, whether it returns the new row's id)."""
    text = sql.replace("?", "%s")
    text = _REWRITE.get(text, text)
    returning = text.startswith(_RETURNING_ID)
    if returning:
        text += " RETURNING id"
    return text, returning


class Cursor:
    """The rows and counts of one executed statement."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int, lastrowid: int | None) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    async def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows.pop(0) if self._rows else None

    async def fetchall(self) -> list[tuple[Any, ...]]:
        rows, self._rows = self._rows, []
        return rows

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Pending:
    """`await db.execute(...)` and `async with db.execute(...) as cur` both work."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], sql: str, params: Sequence[Any]):
        self._conn, self._sql, self._params = conn, sql, params

    async def _run(self) -> Cursor:
        text, returning = to_pg(self._sql)
        cur = await self._conn.execute(text.encode(), tuple(self._params))
        rows = list(await cur.fetchall()) if cur.description is not None else []
        lastrowid = int(rows.pop(0)[0]) if returning and rows else None
        return Cursor(rows, cur.rowcount, lastrowid)

    def __await__(self) -> Generator[Any, None, Cursor]:
        return self._run().__await__()

    async def __aenter__(self) -> Cursor:
        return await self._run()

    async def __aexit__(self, *exc: object) -> None:
        return None


class Connection:
    """The aiosqlite-shaped face of one psycopg AsyncConnection."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.pg = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Pending:
        return _Pending(self.pg, sql, params)

    async def close(self) -> None:
        await self.pg.close()
