"""Opening the keystore for one step of a workflow, without click.

A workflow (create a disk, serve it, destroy it) touches the keystore in short steps with
long work in between (a KDF, an erase, nbdkit starting): each step opens the database, runs
one coroutine against the repository and closes it again, so no transaction and no
connection stays open across the long work.

A step that awaits nothing but the keystore can run without an event loop (`blocking=True`):
on SQLite its coroutine runs on a connection whose awaits never suspend, driven by one
`send(None)`, so asyncio is never imported; the live USB rule commands start that much faster
(issue 26). The repository's code is the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Coroutine
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

from keystore import paths
from keystore.auth import AuthPolicy
from keystore.backends import open_blocking, open_repository
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
        self,
        fn: Callable[[Repository], Awaitable[T]],
        *,
        policy: AuthPolicy | None = None,
        blocking: bool = False,
    ) -> T:
        """Open the keystore (with `policy` for verifiers), await `fn(repo)`, close it;
        keystore errors propagate.

        `blocking`: `fn` awaits the repository alone (no password to hash or verify, no
        sleep), so where the backend has a blocking connection it runs without an event loop.
        """

        async def use(repo: Repository) -> T:
            try:
                return await fn(repo)
            finally:
                await repo.close()

        if blocking:
            repo = open_blocking(self.location, policy=policy)
            if repo is not None:
                return _to_the_end(use(repo))

        async def go() -> T:
            return await use(await open_repository(self.location, policy=policy))

        import asyncio  # here: a blocking step never loads it

        return asyncio.run(go())


def _to_the_end(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine whose awaits never suspend: its first `send(None)` finishes it."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a blocking keystore step awaited something other than the keystore")
