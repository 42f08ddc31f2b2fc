"""The backend registry: the one place that knows which backend serves a `Location`.

An SQLite file is keystore.sqlite (the embedded default), a postgresql:// URL is
keystore.postgres; both run the one repository of keystore.storage. The backends are
imported lazily, so a host without PostgreSQL never loads psycopg.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from keystore.audit import VerifyResult
from keystore.auth import AuthPolicy
from keystore.location import Location
from keystore.models import AuditEntry
from keystore.repository import Repository

Where = Location | str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class Initialised:
    """What `initialise` did: created the keystore, or upgraded it from `old` to `version`."""

    created: bool
    old: int
    version: int


async def open_repository(where: Where, *, policy: AuthPolicy | None = None) -> Repository:
    """Open the keystore at `where` with the backend its location names."""
    location = Location.parse(where)
    if location.file is None:
        from keystore.postgres.repository import PostgresRepository

        return await PostgresRepository.open(str(location), policy=policy)
    from keystore.sqlite.repository import SqliteRepository

    return await SqliteRepository.open(location.file, policy=policy)


def initialise(where: Where) -> Initialised:
    """Create the keystore at `where`, or bring its schema to this version's."""
    location = Location.parse(where)
    if location.file is None:
        from keystore.postgres import connection as pgconn
        from keystore.postgres.schema import SCHEMA_VERSION as PG_VERSION

        created, old = pgconn.initialise(str(location))
        return Initialised(created, old, PG_VERSION)
    from keystore.sqlite import connection as dbmod
    from keystore.sqlite.schema import SCHEMA_VERSION

    created, old = dbmod.initialise(location.file)
    return Initialised(created, old, SCHEMA_VERSION)


def append_audit(
    where: Where,
    actor: str,
    action: str,
    vm: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one audit row in its own transaction (synchronous, any process)."""
    location = Location.parse(where)
    if location.file is None:
        from keystore.postgres import audit as pgaudit
        from keystore.postgres import connection as pgconn

        conn = pgconn.connect_sync(str(location))
        try:
            return pgaudit.append_sync(conn, actor, action, vm, detail)
        finally:
            conn.close()
    from keystore.sqlite import audit

    return audit.append_audit(location.file, actor, action, vm, detail)


def verify_audit(where: Where, anchor: str | None = None) -> VerifyResult:
    """Verify the audit chain of the keystore at `where` (read-only, synchronous)."""
    location = Location.parse(where)
    if location.file is None:
        from keystore.postgres.audit import verify_sync

        return verify_sync(str(location), anchor)
    from keystore.sqlite import audit

    return audit.verify(location.file, anchor)
