"""The PostgreSQL implementation of `keystore.repository.Repository`.

The operations are the SQLite backend's (keystore.sqlite.repository), run through
keystore.postgres.dialect on one psycopg AsyncConnection; what differs is the plumbing
below: write transactions that lock the audit head first (so writers serialize
cluster-wide, as SQLite's BEGIN IMMEDIATE serializes them on one host), the audit head
table, snapshot reads for verification, and the cluster-wide disk leases.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import psycopg

from keystore import audit as auditmod
from keystore.auth import AuthPolicy
from keystore.errors import Conflict, KeystoreError
from keystore.models import AuditEntry
from keystore.postgres import audit as pgaudit
from keystore.postgres import connection as pgconn
from keystore.postgres.dialect import Connection
from keystore.sqlite.base import Clock
from keystore.sqlite.repository import SqliteRepository


class PostgresRepository(SqliteRepository):
    """Keystore in a PostgreSQL database. Use `await PostgresRepository.open(url)`."""

    url: str
    _pg: Connection

    @classmethod
    async def open(  # type: ignore[override]
        cls, url: str, *, policy: AuthPolicy | None = None, clock: Clock = auditmod.now
    ) -> PostgresRepository:
        """Connect to a keystore created by `vmshield init --db URL`."""
        conn = Connection(await pgconn.connect_async(url))
        repo = cls(cast(Any, conn), Path("postgresql"), policy=policy or AuthPolicy(), clock=clock)
        repo.url = url
        repo._pg = conn
        return repo

    @property
    def pg(self) -> psycopg.AsyncConnection[Any]:
        """The underlying psycopg connection (leases, tests)."""
        return self._pg.pg

    def _fail(self, exc: psycopg.Error) -> KeystoreError:
        if isinstance(exc, psycopg.errors.IntegrityError):
            return Conflict(f"keystore constraint violated: {str(exc).splitlines()[0]}")
        return pgconn.translate(exc, self.url)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[Any]:
        """One transaction that holds the audit head's row lock from its first statement."""
        try:
            async with self.pg.transaction():
                await self.pg.execute(pgaudit.LOCK_HEAD_SQL)
                yield self._pg
        except psycopg.Error as e:
            raise self._fail(e) from e

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            async with self._pg.execute(sql, params) as cur:
                return await cur.fetchone()
        except psycopg.Error as e:
            raise self._fail(e) from e

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            async with self._pg.execute(sql, params) as cur:
                return await cur.fetchall()
        except psycopg.Error as e:
            raise self._fail(e) from e

    async def _exists(self, sql: str, *params: Any) -> bool:
        return await self._one(sql, params) is not None

    async def _audit(
        self, db: Any, actor: str, action: str, vm: str | None, detail: dict[str, Any] | None
    ) -> AuditEntry:
        """Append an audit row inside the caller's transaction (the head is locked)."""
        cur = await self.pg.execute(pgaudit.LOCK_HEAD_SQL)
        params = auditmod.next_row(pgaudit.last_of(await cur.fetchone()), actor, action, vm, detail)
        await self.pg.execute(pgaudit.INSERT_SQL, params)
        await self.pg.execute(pgaudit.SET_HEAD_SQL, (params[0], params[7]))
        return auditmod.entry_from_row(params)

    async def list_audit(self, vm: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        """Oldest first; with `limit`, the most recent `limit` rows."""
        where, params = ("WHERE vm = ?", [vm]) if vm else ("", [])
        sql = f"SELECT * FROM ({auditmod.SELECT_SQL} {where} ORDER BY seq DESC"
        sql += f" LIMIT {int(limit)}) AS a ORDER BY seq" if limit else ") AS a ORDER BY seq"
        return [auditmod.entry_from_row(r) for r in await self._all(sql, params)]

    async def verify_audit(self, anchor: str | None = None) -> auditmod.VerifyResult:
        try:
            async with self.pg.transaction():
                await self.pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cur = await self.pg.execute(auditmod.SELECT_SQL + " ORDER BY seq")
                rows = [tuple(r) for r in await cur.fetchall()]
                head = await (await self.pg.execute(pgaudit.HEAD_SQL)).fetchone()
        except psycopg.Error as e:
            raise self._fail(e) from e
        return auditmod.verify_rows(rows, pgaudit.recorded_head(head), anchor)


__all__ = ["PostgresRepository"]
