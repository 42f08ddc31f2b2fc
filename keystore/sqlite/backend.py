"""The SQLite backend as keystore.backends sees it (the embedded default)."""

from __future__ import annotations

from typing import Any

from keystore.audit import VerifyResult
from keystore.auth import AuthPolicy
from keystore.location import Location
from keystore.models import AuditEntry
from keystore.repository import Repository
from keystore.sqlite import audit
from keystore.sqlite import connection as dbmod
from keystore.sqlite.repository import SqliteRepository
from keystore.sqlite.schema import SCHEMA_VERSION


async def open_repository(location: Location, policy: AuthPolicy | None) -> Repository:
    return await SqliteRepository.open(location.require_file(), policy=policy)


def open_blocking(location: Location, policy: AuthPolicy | None) -> Repository:
    return SqliteRepository.open_blocking(location.require_file(), policy=policy)


def initialise(location: Location) -> tuple[bool, int, int]:
    created, old = dbmod.initialise(location.require_file())
    return created, old, SCHEMA_VERSION


def append_audit(
    location: Location, actor: str, action: str, vm: str | None, detail: dict[str, Any] | None
) -> AuditEntry:
    return audit.append_audit(location.require_file(), actor, action, vm, detail)


def verify_audit(location: Location, anchor: str | None) -> VerifyResult:
    return audit.verify(location.require_file(), anchor)
