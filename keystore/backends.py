"""Opening the keystore at a `Location` with the backend that serves it.

The backends are imported lazily, so a host without PostgreSQL never loads psycopg.
"""

from __future__ import annotations

import os

from keystore.audit import VerifyResult
from keystore.auth import AuthPolicy
from keystore.location import Location
from keystore.repository import Repository


async def open_repository(
    where: Location | str | os.PathLike[str], *, policy: AuthPolicy | None = None
) -> Repository:
    """Open the keystore at `where` with the backend its location names."""
    location = Location.parse(where)
    if location.file is None:
        from keystore.postgres.repository import PostgresRepository

        return await PostgresRepository.open(str(location), policy=policy)
    from keystore.sqlite.repository import SqliteRepository

    return await SqliteRepository.open(location.file, policy=policy)


def verify_audit(
    where: Location | str | os.PathLike[str], anchor: str | None = None
) -> VerifyResult:
    """Verify the audit chain of the keystore at `where` (read-only, synchronous)."""
    location = Location.parse(where)
    if location.file is None:
        from keystore.postgres.audit import verify_sync

        return verify_sync(str(location), anchor)
    from keystore import audit

    return audit.verify(location.file, anchor)
