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
from keystore.auth import AuthPolicy
from keystore.backends import Location, open_repository
from keystore.errors import NeedsLocalKeystore
from keystore.postgres.url import PgUrl
from keystore.repository import Repository

T = TypeVar("T")


class Keystore:
    """One keystore (an SQLite file or a PostgreSQL URL), opened anew for each step (`run`)."""

    def __init__(self, db: Location | None = None) -> None:
        #: where it is; None means the default (`$VMSHIELD_DB`, else the system or user file)
        self.location: Location = db if db is not None else paths.default_db_path()

    @property
    def path(self) -> Path:
        """The keystore's file, for what lives next to it (jobs, default image directory)."""
        if isinstance(self.location, PgUrl):
            where = self.location.redacted()
            raise NeedsLocalKeystore(f"this needs a local keystore file, not {where}")
        return self.location

    def run(
        self, fn: Callable[[Repository], Awaitable[T]], *, policy: AuthPolicy | None = None
    ) -> T:
        """Open the keystore (with `policy` for verifiers), await `fn(repo)`, close it;
        keystore errors propagate."""

        async def go() -> T:
            repo = await open_repository(self.location, policy=policy)
            try:
                return await fn(repo)
            finally:
                await repo.close()

        return asyncio.run(go())
