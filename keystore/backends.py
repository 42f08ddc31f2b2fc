"""Choosing the keystore backend from the form of `--db` / VMSHIELD_DB.

A `postgresql://` (or `postgres://`) URL opens keystore.postgres, anything else is an SQLite
file (keystore.sqlite, the embedded default). The backends are imported lazily, so a host
without PostgreSQL never loads psycopg.
"""

from __future__ import annotations

from pathlib import Path

from keystore.audit import VerifyResult
from keystore.auth import AuthPolicy
from keystore.postgres.url import PgUrl, is_url
from keystore.repository import Repository

Location = Path | PgUrl
"""Where a keystore is: an SQLite file, or a PostgreSQL URL (`postgresql://...`)."""


def parse_location(value: str | Path) -> Location:
    """`--db` / VMSHIELD_DB as given: a PostgreSQL URL stays text, anything else is a path."""
    if isinstance(value, Path):
        return value
    return PgUrl(value) if is_url(value) else Path(value)


async def open_repository(location: Location, *, policy: AuthPolicy | None = None) -> Repository:
    """Open the keystore at `location` with the backend its form names."""
    if isinstance(location, PgUrl):
        from keystore.postgres.repository import PostgresRepository

        return await PostgresRepository.open(location, policy=policy)
    from keystore.sqlite.repository import SqliteRepository

    return await SqliteRepository.open(location, policy=policy)


def verify_audit(location: Location, anchor: str | None = None) -> VerifyResult:
    """Verify the audit chain of the keystore at `location` (read-only, synchronous)."""
    if isinstance(location, PgUrl):
        from keystore.postgres.audit import verify_sync

        return verify_sync(location, anchor)
    from keystore import audit

    return audit.verify(location, anchor)
