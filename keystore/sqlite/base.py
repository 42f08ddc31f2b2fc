"""Plumbing shared by the SQLite repository's parts: the connection, write transactions
that translate sqlite errors, and the audit row written inside each change."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import aiosqlite

from keystore import audit as auditmod
from keystore.auth import AuthPolicy
from keystore.errors import Conflict, NotFound
from keystore.models import AuditEntry
from keystore.sqlite import connection as dbmod

Clock = Callable[[], datetime]


def dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class SqliteBase:
    """The connection and helpers; subclasses add the tables' operations."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        path: Path,
        *,
        policy: AuthPolicy,
        clock: Clock = auditmod.now,
    ) -> None:
        self._db = conn
        self.path = path
        self.policy = policy
        self.clock = clock

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _now(self) -> str:
        return self.clock().isoformat()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One IMMEDIATE transaction; sqlite errors become KeystoreErrors naming the file."""
        try:
            await self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e
        try:
            yield self._db
            await self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.IntegrityError):
                raise Conflict(f"keystore constraint violated: {exc}") from exc
            if isinstance(exc, sqlite3.Error):
                raise dbmod.translate(exc, self.path) from exc
            raise

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        try:
            async with self._db.execute(sql, params) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e
        return row

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self._db.execute(sql, params) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e
        return list(rows)

    async def _audit(
        self,
        db: aiosqlite.Connection,
        actor: str,
        action: str,
        vm: str | None,
        detail: dict[str, Any] | None,
    ) -> AuditEntry:
        """Append an audit row inside the caller's write transaction."""
        async with db.execute(auditmod.LAST_SQL) as cur:
            last = await cur.fetchone()
        params = auditmod.next_row(tuple(last) if last else None, actor, action, vm, detail)
        await db.execute(auditmod.INSERT_SQL, params)
        await db.execute(auditmod.HEAD_SQL, (auditmod.HEAD_KEY, f"{params[0]}:{params[7]}"))
        return auditmod.entry_from_row(params)

    async def _vm_uuid(self, name: str) -> str:
        row = await self._one("SELECT uuid FROM vms WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"no VM named {name!r} (see `vmshield vm list`)")
        return str(row[0])

    async def _exists(self, sql: str, *params: Any) -> bool:
        async with self._db.execute(sql, params) as cur:
            return await cur.fetchone() is not None
