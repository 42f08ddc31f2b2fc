"""Opening the keystore for one step of a workflow, without click.

A workflow (create a disk, serve it, destroy it) touches the keystore in short steps with
long work in between (a KDF, an erase, nbdkit starting): each step opens the database, runs
one coroutine against the repository and closes it again, so no transaction and no
connection stays open across the long work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from keystore import paths
from keystore.repository import Repository
from keystore.sqlite.repository import SqliteRepository

T = TypeVar("T")


def resolve_db(db: Path | None) -> Path:
    """`db`, else the default keystore (`$VMSHIELD_DB`, then the system or user path)."""
    return db if db is not None else paths.default_db_path()


async def open_repository(db: Path) -> Repository:
    """The repository of the keystore at `db`."""
    return await SqliteRepository.open(db)


class Keystore:
    """One keystore, opened anew for each step (`run`)."""

    def __init__(self, db: Path | None = None) -> None:
        self.path = resolve_db(db)

    def run(self, fn: Callable[[Repository], Awaitable[T]]) -> T:
        """Open the keystore, await `fn(repo)`, close it; keystore errors propagate."""

        async def go() -> T:
            repo = await open_repository(self.path)
            try:
                return await fn(repo)
            finally:
                await repo.close()

        return asyncio.run(go())
