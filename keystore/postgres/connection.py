"""Connecting to the PostgreSQL keystore: schema checks, migrations, error translation.

Connections are in autocommit mode; the repository opens explicit transactions for writes.
Messages name the database by its URL with any password redacted.
"""

from __future__ import annotations

from typing import Any

import psycopg

from keystore.errors import DatabaseUnavailable, KeystoreBusy, KeystoreError
from keystore.location import redact, refuse_password
from keystore.postgres.schema import MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION
from keystore.storage.schema import check_version

#: Seconds to wait for the server before a connection attempt fails.
CONNECT_TIMEOUT = 5

_EXISTS_SQL = "SELECT to_regclass('schema_version') IS NOT NULL"
_VERSION_SQL = "SELECT max(version) FROM schema_version"


def _version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(_EXISTS_SQL).fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute(_VERSION_SQL).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def _version_async(conn: psycopg.AsyncConnection[Any]) -> int:
    row = await (await conn.execute(_EXISTS_SQL)).fetchone()
    if not row or not row[0]:
        return 0
    row = await (await conn.execute(_VERSION_SQL)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _kwargs(application_name: str = "vmshield") -> dict[str, Any]:
    return {
        "autocommit": True,
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": application_name,
    }


def translate(exc: BaseException, url: str) -> KeystoreError:
    """A psycopg error as a KeystoreError that names the database (never its password)."""
    where = redact(url)
    if isinstance(exc, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
        return KeystoreBusy(f"keystore {where} is busy: {exc}".strip())
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return DatabaseUnavailable(f"keystore {where}: permission denied ({exc})".strip())
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseUnavailable(f"cannot use keystore {where}: {first}")


def _check_version(version: int, url: str) -> None:
    check_version(version, SCHEMA_VERSION, redact(url), init=f"vmshield init --db {redact(url)}")


def connect_sync(url: str, application_name: str = "vmshield") -> psycopg.Connection[Any]:
    """A synchronous autocommit connection on a current schema (usbgate, audit verify)."""
    refuse_password(url)
    try:
        conn = psycopg.connect(str(url), **_kwargs(application_name))
    except psycopg.Error as e:
        raise translate(e, url) from e
    try:
        _check_version(_version(conn), url)
    except psycopg.Error as e:
        conn.close()
        raise translate(e, url) from e
    except BaseException:
        conn.close()
        raise
    return conn


async def connect_async(url: str) -> psycopg.AsyncConnection[Any]:
    """An async autocommit connection on a current schema (the repository)."""
    refuse_password(url)
    try:
        conn = await psycopg.AsyncConnection.connect(str(url), **_kwargs())
    except psycopg.Error as e:
        raise translate(e, url) from e
    try:
        _check_version(await _version_async(conn), url)
    except psycopg.Error as e:
        await conn.close()
        raise translate(e, url) from e
    except BaseException:
        await conn.close()
        raise
    return conn


# Database privileges live in pg_database, which CREATE DATABASE ... TEMPLATE does not copy:
# applied on every init, not in a migration. TEMP: a restricted role's TEMP table shadows a
# table of the same name for every unqualified lookup in its session (issue #20 B11).
_DATABASE_SQL = """
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO vmshield_admin', current_database());
END $$
"""
# REVOKE by a role without the grant option only warns: check what the usbgate role can do
_LOOSE_SQL = (
    "SELECT has_database_privilege('vmshield_usbgate', current_database(), 'TEMPORARY'), "
    "has_function_privilege('vmshield_usbgate', 'pg_try_advisory_lock(bigint)', "
    "'EXECUTE')"
)


def initialise(url: str) -> tuple[bool, int]:
    """Create or upgrade the schema (needs a role that may create tables and roles).

    Returns (created, previous version). All migrations run in one transaction under an
    advisory lock: concurrent `vmshield init`s wait for each other, a failure changes nothing.
    """
    refuse_password(url)
    try:
        with psycopg.connect(str(url), **_kwargs()) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            version = _version(conn)
            if version > SCHEMA_VERSION:
                _check_version(version, url)
            if version == 0:
                tables = conn.execute(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
                ).fetchone()
                if tables and tables[0]:
                    raise DatabaseUnavailable(
                        f"{redact(url)} already has tables but is not a vmshield keystore"
                    )
                conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO schema_version VALUES (0)")
            for n in range(version, SCHEMA_VERSION):
                conn.execute(MIGRATIONS[n].encode())
            conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
            conn.execute("GRANT SELECT ON schema_version TO vmshield_admin, vmshield_usbgate")
            conn.execute(_DATABASE_SQL)
            loose = conn.execute(_LOOSE_SQL).fetchone()
            if loose and any(loose):
                raise DatabaseUnavailable(
                    f"cannot take TEMP and the advisory locks from PUBLIC on {redact(url)}: "
                    "run `vmshield init` as a superuser (or the database's owner after a "
                    "superuser did it once)"
                )
    except psycopg.Error as e:
        raise translate(e, url) from e
    return version == 0, version


def rules_channel(vm_uuid: str) -> str:
    """The NOTIFY channel of one VM's USB rules (the trigger in schema.py builds the same)."""
    return "vmshield_usb_" + vm_uuid.replace("-", "")


__all__ = ["connect_async", "connect_sync", "initialise", "rules_channel", "translate"]
