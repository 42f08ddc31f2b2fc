"""The keystore on PostgreSQL (psycopg async): the repository's connection adapter and opener.

Every write transaction first takes the `audit_head` row lock (keystore.postgres.audit), so
writers serialize cluster-wide as SQLite's `BEGIN IMMEDIATE` serializes them on one host;
the head row is the chain's tip and its recorded head at once. Verification reads one
REPEATABLE READ snapshot.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg

from keystore import audit as auditmod
from keystore.auth import AuthPolicy
from keystore.errors import Conflict, KeystoreError
from keystore.location import PostgresLocation
from keystore.postgres import audit as pgaudit
from keystore.postgres import connection as pgconn
from keystore.storage.connection import Params, Row
from keystore.storage.dialect import POSTGRES
from keystore.storage.repository import Clock, StoreRepository


class PostgresConnection:
    """`keystore.storage.connection.Connection` on one psycopg AsyncConnection."""

    def __init__(self, pg: psycopg.AsyncConnection[Any], url: str) -> None:
        self.pg = pg
        self.url = url
        self.location = PostgresLocation(url)

    def _fail(self, exc: psycopg.Error) -> KeystoreError:
        if isinstance(exc, psycopg.errors.IntegrityError):
            return Conflict(f"keystore constraint violated: {str(exc).splitlines()[0]}")
        return pgconn.translate(exc, self.url)

    async def _cursor(self, template: str, params: Params | None) -> psycopg.AsyncCursor[Any]:
        try:
            return await self.pg.execute(POSTGRES.sql(template).encode(), dict(params or {}))
        except psycopg.Error as e:
            raise self._fail(e) from e

    async def one(self, template: str, params: Params | None = None) -> Row | None:
        found = await self.all(template, params)
        return found[0] if found else None

    async def all(self, template: str, params: Params | None = None) -> list[Row]:
        cur = await self._cursor(template, params)
        return [tuple(r) for r in await cur.fetchall()] if cur.description is not None else []

    async def run(self, template: str, params: Params | None = None) -> int:
        return (await self._cursor(template, params)).rowcount

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        try:
            async with self.pg.transaction():
                await self.pg.execute(pgaudit.LOCK_HEAD_SQL)
                yield
        except psycopg.Error as e:
            raise self._fail(e) from e

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[None]:
        try:
            async with self.pg.transaction():
                await self.pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                yield
        except psycopg.Error as e:
            raise self._fail(e) from e

    async def audit_tip(self) -> tuple[int, str] | None:
        cur = await self._cursor(pgaudit.LOCK_HEAD_SQL, None)
        return pgaudit.last_of(await cur.fetchone())

    async def set_audit_tip(self, seq: int, hash_: str) -> None:
        await self.run(pgaudit.SET_HEAD, {"seq": seq, "hash": hash_})

    async def recorded_head(self) -> str | None:
        return pgaudit.recorded_head(await self.one(pgaudit.HEAD))

    async def close(self) -> None:
        await self.pg.close()


class PostgresRepository(StoreRepository):
    """The keystore in a PostgreSQL database. Use `await PostgresRepository.open(url)`."""

    conn: PostgresConnection

    @property
    def url(self) -> str:
        return self.conn.url

    @property
    def pg(self) -> psycopg.AsyncConnection[Any]:
        """The underlying psycopg connection (leases, tests)."""
        return self.conn.pg

    @classmethod
    async def open(
        cls, url: str, *, policy: AuthPolicy | None = None, clock: Clock = auditmod.now
    ) -> PostgresRepository:
        """Connect to a keystore created by `vmshield init --db URL`."""
        conn = PostgresConnection(await pgconn.connect_async(url), url)
        return cls(conn, policy=policy or AuthPolicy(), clock=clock)


__all__ = ["PostgresConnection", "PostgresRepository"]
