"""The PostgreSQL backend as keystore.backends sees it (one keystore for many hosts)."""

from __future__ import annotations

from typing import Any

from keystore.audit import VerifyResult
from keystore.auth import AuthPolicy
from keystore.location import Location
from keystore.models import AuditEntry
from keystore.postgres import audit
from keystore.postgres import connection as pgconn
from keystore.postgres.repository import PostgresRepository
from keystore.postgres.schema import SCHEMA_VERSION
from keystore.repository import Repository


async def open_repository(location: Location, policy: AuthPolicy | None) -> Repository:
    return await PostgresRepository.open(str(location), policy=policy)


def open_blocking(location: Location, policy: AuthPolicy | None) -> None:
    return None  # psycopg's connection here is the async one: it runs on an event loop


def initialise(location: Location) -> tuple[bool, int, int]:
    created, old = pgconn.initialise(str(location))
    return created, old, SCHEMA_VERSION


def append_audit(
    location: Location, actor: str, action: str, vm: str | None, detail: dict[str, Any] | None
) -> AuditEntry:
    conn = pgconn.connect_sync(str(location))
    try:
        return audit.append_sync(conn, actor, action, vm, detail)
    finally:
        conn.close()


def verify_audit(location: Location, anchor: str | None) -> VerifyResult:
    return audit.verify_sync(str(location), anchor)
