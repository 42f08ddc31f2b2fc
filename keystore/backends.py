"""The backend registry: which backend serves a `Location` (ovirt-imageio's backends shape).

Each backend module (keystore/sqlite/backend.py, keystore/postgres/backend.py) has the same
four functions (`Backend`); `Location.kind` picks one. Both run the one repository of
keystore.storage. Backends are imported when first used, so a host without PostgreSQL
never loads psycopg.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Protocol

from keystore.audit import VerifyResult
from keystore.auth import AuthPolicy
from keystore.location import Location
from keystore.models import AuditEntry
from keystore.repository import Repository

Where = Location | str | os.PathLike[str]


class Backend(Protocol):
    """What a backend module offers the rest of the keystore."""

    async def open_repository(
        self, location: Location, policy: AuthPolicy | None
    ) -> Repository: ...
    def open_blocking(self, location: Location, policy: AuthPolicy | None) -> Repository | None: ...
    def initialise(self, location: Location) -> tuple[bool, int, int]: ...
    def append_audit(
        self, location: Location, actor: str, action: str, vm: str | None,
        detail: dict[str, Any] | None,
    ) -> AuditEntry: ...  # fmt: skip
    def verify_audit(self, location: Location, anchor: str | None) -> VerifyResult: ...


def _sqlite() -> Backend:
    from keystore.sqlite import backend

    return backend


def _postgres() -> Backend:
    from keystore.postgres import backend

    return backend


#: Location.kind -> its backend module, imported on first use
BACKENDS: dict[str, Callable[[], Backend]] = {"sqlite": _sqlite, "postgresql": _postgres}


def backend(where: Where) -> tuple[Location, Backend]:
    location = Location.parse(where)
    return location, BACKENDS[location.kind]()


@dataclasses.dataclass(frozen=True)
class Initialised:
    """What `initialise` did: created the keystore, or upgraded it from `old` to `version`."""

    created: bool
    old: int
    version: int


async def open_repository(where: Where, *, policy: AuthPolicy | None = None) -> Repository:
    """Open the keystore at `where` with the backend its location names."""
    location, b = backend(where)
    return await b.open_repository(location, policy)


def open_blocking(where: Where, *, policy: AuthPolicy | None = None) -> Repository | None:
    """The keystore at `where` on a connection whose awaits never suspend (its coroutines
    run to their end on one `send(None)`, no event loop), or None if its backend has none."""
    location, b = backend(where)
    return b.open_blocking(location, policy)


def initialise(where: Where) -> Initialised:
    """Create the keystore at `where`, or bring its schema to this version's."""
    location, b = backend(where)
    return Initialised(*b.initialise(location))


def append_audit(
    where: Where,
    actor: str,
    action: str,
    vm: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one audit row in its own transaction (synchronous, any process)."""
    location, b = backend(where)
    return b.append_audit(location, actor, action, vm, detail)


def verify_audit(where: Where, anchor: str | None = None) -> VerifyResult:
    """Verify the audit chain of the keystore at `where` (read-only, synchronous)."""
    location, b = backend(where)
    return b.verify_audit(location, anchor)
