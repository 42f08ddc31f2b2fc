"""Opening the keystore for one step of a workflow, without click.

A workflow (create a disk, serve it, destroy it) touches the keystore in short steps with
long work in between (a KDF, an erase, nbdkit starting): each step opens the database, runs
one coroutine against the repository and closes it again, so no transaction and no
connection stays open across the long work.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from os import PathLike
from pathlib import Path
from typing import TypeVar

from keystore import paths
from keystore.auth import AuthPolicy
from keystore.backends import open_repository
from keystore.location import Location
from keystore.repository import Repository

T = TypeVar("T")


class Keystore:
    """One keystore (an SQLite file or a PostgreSQL URL), opened anew for each step (`run`)."""

    def __init__(self, db: Location | str | PathLike[str] | None = None) -> None:
        #: where it is; None means the default (`$VMSHIELD_DB`, else the system or user file)
        self.location = Location.parse(db if db is not None else paths.default_db_path())

    @property
    def path(self) -> Path:
        """The keystore's file, for what lives next to it (jobs, default image directory)."""
        return self.location.require_file()

    def state_dir(self) -> Path:
        """Where this host keeps what its operations on this keystore leave (password-change
        journals, disk-create markers): next to the keystore file; for a PostgreSQL keystore,
        beside this host's default keystore file, where its disks are."""
        here = self.location.file
        if here is not None:
            return here.parent
        if os.geteuid() == 0:
            return paths.SYSTEM_DB.parent
        data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(data) / "vmshield"

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
