"""The keystore on SQLite: the repository's connection adapters and their openers.

Writers start with `BEGIN IMMEDIATE`, so two processes never deadlock on a read-to-write
upgrade: the second waits up to the busy timeout, then gets KeystoreBusy. The audit chain's
tip is its last row; the recorded head ("SEQ:HASH", to catch a deleted tail) is a `meta` row.

Two adapters share all of that and differ only in how a statement runs: `SqliteConnection`
on aiosqlite (a thread per connection: the event loop never blocks on the file), and
`BlockingConnection` on the stdlib's sqlite3, whose awaits never suspend: a coroutine of the
one repository on it runs to its end on its first `send(None)`, with no event loop and
without importing asyncio (keystore.services.store drives it that way for the live USB rule
commands, which must start fast).
"""

from __future__ import annotations

import abc
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from keystore import audit as auditmod
from keystore.auth import AuthPolicy
from keystore.errors import Conflict, KeystoreError
from keystore.location import SqliteLocation
from keystore.sqlite import connection as dbmod
from keystore.sqlite.audit import HEAD, HEAD_KEY, LAST, SET_HEAD
from keystore.storage.connection import Params, Row
from keystore.storage.dialect import SQLITE
from keystore.storage.repository import Clock, StoreRepository

if TYPE_CHECKING:
    import aiosqlite


def fail(exc: sqlite3.Error, path: Path) -> KeystoreError:
    """A driver error as the KeystoreError the caller sees."""
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"keystore constraint violated: {exc}")
    return dbmod.translate(exc, path)


class _Adapter(abc.ABC):
    """What both adapters share: `keystore.storage.connection.Connection` over `_rows` and
    `_execute`, the two ways a statement runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = SqliteLocation(path)

    @abc.abstractmethod
    async def _rows(self, template: str, params: Params | None) -> tuple[list[Row], int]:
        """Run a statement: its rows and the number of rows it changed."""

    @abc.abstractmethod
    async def _execute(self, sql: str) -> None:
        """Run a transaction statement (BEGIN, COMMIT, ROLLBACK)."""

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
            await self._execute(begin)
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e
        try:
            yield
            await self._execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                await self._execute("ROLLBACK")
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

    @abc.abstractmethod
    async def close(self) -> None: ...


class SqliteConnection(_Adapter):
    """`keystore.storage.connection.Connection` on one aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        super().__init__(path)
        self.db = db

    async def _rows(self, template: str, params: Params | None) -> tuple[list[Row], int]:
        try:
            async with self.db.execute(SQLITE.sql(template), dict(params or {})) as cur:
                found = [tuple(r) for r in await cur.fetchall()]
                return found, cur.rowcount
        except sqlite3.Error as e:
            raise fail(e, self.path) from e

    async def _execute(self, sql: str) -> None:
        await self.db.execute(sql)

    async def close(self) -> None:
        await self.db.close()


class BlockingConnection(_Adapter):
    """`keystore.storage.connection.Connection` on one sqlite3 connection: every await
    returns at once (it blocks instead, as long as SQLite's busy timeout at most)."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        super().__init__(path)
        self.db = db

    async def _rows(self, template: str, params: Params | None) -> tuple[list[Row], int]:
        try:
            cur = self.db.execute(SQLITE.sql(template), dict(params or {}))
            try:
                return [tuple(r) for r in cur.fetchall()], cur.rowcount
            finally:
                cur.close()
        except sqlite3.Error as e:
            raise fail(e, self.path) from e

    async def _execute(self, sql: str) -> None:
        self.db.execute(sql)

    async def close(self) -> None:
        self.db.close()


class SqliteRepository(StoreRepository):
    """The keystore in one SQLite file. Use `await SqliteRepository.open(path)`."""

    conn: SqliteConnection | BlockingConnection

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

    @classmethod
    def open_blocking(
        cls, path: str | Path, *, policy: AuthPolicy | None = None, clock: Clock = auditmod.now
    ) -> SqliteRepository:
        """`open`, on a `BlockingConnection`: drive its coroutines with `send(None)`
        (keystore.services.store) or await them as any others."""
        p = Path(path)
        return cls(
            BlockingConnection(dbmod.open_blocking(p), p),
            policy=policy or AuthPolicy(),
            clock=clock,
        )


__all__ = ["BlockingConnection", "SqliteConnection", "SqliteRepository"]
