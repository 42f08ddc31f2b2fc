"""What the repository needs from a database connection: the adapter interface.

One adapter per driver implements it (keystore.sqlite.adapter on aiosqlite,
keystore.postgres.adapter on psycopg's AsyncConnection). Statements are templates
(keystore.storage.dialect); an adapter renders them for its driver, runs them, and turns
every driver error into a KeystoreError naming the keystore (a constraint violation:
Conflict). What differs in behaviour sits behind `write()` and the audit head: SQLite
serializes writers with `BEGIN IMMEDIATE` and keeps the head in `meta`; PostgreSQL takes
the `audit_head` row lock first, cluster-wide, and keeps the head in that row.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from keystore.location import Location

Row = tuple[Any, ...]
Params = Mapping[str, Any]


class Connection(Protocol):
    """One open keystore connection, in autocommit mode outside `write()` / `snapshot()`."""

    @property
    def location(self) -> Location:
        """Where the keystore is."""
        ...

    async def one(self, template: str, params: Params | None = None) -> Row | None:
        """The first row of a statement, or None."""
        ...

    async def all(self, template: str, params: Params | None = None) -> list[Row]:
        """Every row of a statement."""
        ...

    async def run(self, template: str, params: Params | None = None) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    def write(self) -> AbstractAsyncContextManager[None]:
        """One write transaction, serialized against every other writer of the keystore
        (and so against every audit append); committed on exit, rolled back on an error."""
        ...

    def snapshot(self) -> AbstractAsyncContextManager[None]:
        """One read-only transaction whose reads all see the same committed state."""
        ...

    async def audit_tip(self) -> tuple[int, str] | None:
        """Inside `write()`: the chain's last (seq, hash), None before the first row."""
        ...

    async def set_audit_tip(self, seq: int, hash_: str) -> None:
        """Inside `write()`: record the row just appended as the chain's head."""
        ...

    async def recorded_head(self) -> str | None:
        """The head ("SEQ:HASH") the keystore recorded, None if it has none."""
        ...

    async def close(self) -> None: ...
