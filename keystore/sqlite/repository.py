"""The keystore on SQLite (aiosqlite): the repository's connection adapter and its opener.

Writers start with `BEGIN IMMEDIATE`, so two processes never deadlock on a read-to-write
upgrade: the second waits up to the busy timeout, then gets KeystoreBusy. The audit chain's
tip is its last row; the recorded head ("SEQ:HASH", to catch a deleted tail) is a `meta` row.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite

from keystore import audit as auditmod
from keystore.auth import AuthPolicy
from keystore.errors import Conflict, KeystoreError
from keystore.location import SqliteLocation
from keystore.sqlite import connection as dbmod
from keystore.sqlite.audit import HEAD, HEAD_KEY, LAST, SET_HEAD
from keystore.storage.connection import Params, Row
from keystore.storage.dialect import SQLITE
from keystore.storage.repository import Clock, StoreRepository


def fail(exc: sqlite3.Error, path: Path) -> KeystoreError:
    """A driver error as the KeystoreError the caller sees."""
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"keystore constraint violated: {exc}")
    return dbmod.translate(exc, path)


class SqliteConnection:
    """`keystore.storage.connection.Connection` on one aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self.location = SqliteLocation(path)

    async def _rows(self, template: str, params: Params | None) -> tuple[list[Row], int]:
        try:
            async with self.db.execute(SQLITE.sql(template), dict(params or {})) as cur:
                found = [tuple(r) for r in await cur.fetchall()]
                return found, cur.rowcount
        except sqlite3.Error as e:
            raise fail(e, self.path) from e

    async def one(self, template: str, params: Params | None = None) -> Row | None:
        found, _ = await self._rows(template, params)
        return found[0] if found else None

    async def all(self, template: str, params: Params | None = None) -> list[Row]:
        return (await self._rows(template, params))[0]

    async def run(self, template: str, params: Params | None = None) -> int:
        return (await self._rows(template, params))[1]

    @contextlib.asynccontextmanager
    async def _transaction(self, begin: str) -> AsyncIterator[None]:
        try:
            await self.db.execute(begin)
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e
        try:
            yield
            await self.db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                await self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise fail(exc, self.path) from exc
            raise

    def write(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._transaction("BEGIN IMMEDIATE")

    def snapshot(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._transaction("BEGIN")

    async def audit_tip(self) -> tuple[int, str] | None:
        row = await self.one(LAST)
        return None if row is None else (int(row[0]), str(row[1]))

    async def set_audit_tip(self, seq: int, hash_: str) -> None:
        await self.run(SET_HEAD, {"key": HEAD_KEY, "value": f"{seq}:{hash_}"})

    async def recorded_head(self) -> str | None:
        row = await self.one(HEAD, {"key": HEAD_KEY})
        return None if row is None else str(row[0])

    async def close(self) -> None:
        await self.db.close()


class SqliteRepository(StoreRepository):
    """The keystore in one SQLite file. Use `await SqliteRepository.open(path)`."""

    conn: SqliteConnection

    @property
    def path(self) -> Path:
        return self.conn.path

    @classmethod
    async def open(
        cls, path: str | Path, *, policy: AuthPolicy | None = None, clock: Clock = auditmod.now
    ) -> SqliteRepository:
        """Open an existing keystore (`keystore.sqlite.connection.initialise` creates one);
        an older schema is migrated in place."""
        p = Path(path)
        return cls(
            SqliteConnection(await dbmod.open_async(p), p),
            policy=policy or AuthPolicy(),
            clock=clock,
        )


__all__ = ["SqliteConnection", "SqliteRepository"]
