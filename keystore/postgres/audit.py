"""The audit chain on PostgreSQL: the head row lock that serializes appends, and sync helpers.

Every write transaction (the repository's, usbgate's appends) first takes the head's row lock
(`vmshield_lock_audit_head()`: `SELECT ... FROM audit_head FOR UPDATE`, waited for in steps,
ending a usbgate session that stalls while holding it): the one-row head is the chain's tip,
so appends from any number of hosts queue on that row lock and each sees the previous
append's (seq, hash). That keeps ONE verifiable chain (`vmshield audit verify` unchanged) at
the price of serialized writers; docs/keystore.md has the measured rate and why not per-VM
chains. The usbgate role writes nothing itself: `vmshield_usbgate_audit()` (schema 6)
chains its row on the server (`append_usbgate_sync`).
"""

from __future__ import annotations

from typing import Any

import psycopg

from keystore import audit as auditmod
from keystore.models import AuditEntry
from keystore.postgres import connection as pgconn
from keystore.storage import rows
from keystore.storage.dialect import POSTGRES

LOCK_HEAD_SQL = "SELECT seq, hash FROM public.vmshield_lock_audit_head()"
USBGATE_APPEND_SQL = "SELECT * FROM public.vmshield_usbgate_audit(%s, %s, %s)"
#: the chain's row (named parameters: keystore.storage.rows.audit_params)
INSERT_SQL = POSTGRES.sql(rows.AUDIT_INSERT)
SET_HEAD = "UPDATE audit_head SET seq = {seq}, hash = {hash}"
HEAD = "SELECT seq, hash FROM audit_head"


def last_of(head: tuple[Any, ...] | None) -> tuple[int, str] | None:
    """The chain's last (seq, hash) from the head row; None before the first row."""
    if head is None or int(head[0]) == 0:
        return None
    return int(head[0]), str(head[1])


def recorded_head(head: tuple[Any, ...] | None) -> str | None:
    last = last_of(head)
    return None if last is None else f"{last[0]}:{last[1]}"


def set_head_sync(conn: psycopg.Connection[Any], seq: int, hash_: str) -> None:
    """Move the head onto row `seq` (inside the caller's transaction, the head locked)."""
    conn.execute(POSTGRES.sql(SET_HEAD), {"seq": seq, "hash": hash_})


def append_sync(
    conn: psycopg.Connection[Any],
    actor: str,
    action: str,
    vm: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one row in its own transaction on a synchronous connection (usbgate)."""
    with conn.transaction():
        head = conn.execute(LOCK_HEAD_SQL).fetchone()
        row = auditmod.next_row(last_of(head), actor, action, vm, detail)
        conn.execute(INSERT_SQL, rows.audit_params(row))
        set_head_sync(conn, row[0], row[7])
    return auditmod.entry_from_row(row)


def append_usbgate_sync(
    conn: psycopg.Connection[Any],
    action: str,
    vm: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append a `usb.*` row as actor usbgate, chained by the server (the usbgate role's only
    write): one autocommit statement, so the head is held only while the server appends."""
    text = auditmod.canonical_detail({**(detail or {}), **auditmod.os_identity()})
    with conn.transaction():
        row = conn.execute(USBGATE_APPEND_SQL, (action, vm, text)).fetchone()
    assert row is not None
    return auditmod.entry_from_row(tuple(row))


def verify_sync(url: str, anchor: str | None = None) -> auditmod.VerifyResult:
    """Verify the whole chain from one snapshot (REPEATABLE READ: rows and head agree)."""
    conn = pgconn.connect_sync(url)
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            chain = [tuple(r) for r in conn.execute(rows.AUDIT_SELECT + " ORDER BY seq")]
            head = conn.execute(HEAD).fetchone()
    except psycopg.Error as e:
        raise pgconn.translate(e, url) from e
    finally:
        conn.close()
    return auditmod.verify_rows(chain, recorded_head(head), anchor)
