"""The audit chain of an SQLite keystore from any process, synchronously (usbgate, init).

`append_audit` is the entry point for other components; the repository appends inside its
own write transactions (keystore.storage.repository). Both chain rows the same way
(keystore.audit.next_row) under SQLite's write lock.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from keystore import audit as auditmod
from keystore.models import AuditEntry
from keystore.sqlite import connection as dbmod
from keystore.storage import rows
from keystore.storage.dialect import SQLITE

#: the `meta` row that records the chain's head ("SEQ:HASH": catches a deleted tail); the
#: chain's tip is its last row
HEAD_KEY = "audit_head"
LAST = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
SET_HEAD = (
    "INSERT INTO meta (key, value) VALUES ({key}, {value}) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
HEAD = "SELECT value FROM meta WHERE key = {key}"


def append_audit(
    db: str | Path,
    actor: str,
    action: str,
    vm: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one row to the audit trail of the keystore at `db` (synchronous, any process).

    `actor` says who (a principal or a component such as "usbgate"), `action` what, as a
    dotted verb ("usb.attach", "disk.erase.done"), `vm` the VM name if any, `detail` a small
    JSON-able dict without secrets. Raises KeystoreBusy / DatabaseUnavailable.
    """
    path = Path(db)
    conn = dbmod.open_sync(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            last = conn.execute(LAST).fetchone()
            row = auditmod.next_row(tuple(last) if last else None, actor, action, vm, detail)
            conn.execute(SQLITE.sql(rows.AUDIT_INSERT), rows.audit_params(row))
            conn.execute(
                SQLITE.sql(SET_HEAD),
                {"key": HEAD_KEY, "value": f"{row[0]}:{row[7]}"},
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        raise dbmod.translate(e, path) from e
    finally:
        conn.close()
    return auditmod.entry_from_row(row)


def verify(db: str | Path, anchor: str | None = None) -> auditmod.VerifyResult:
    """Verify the audit chain of the keystore at `db` (read-only, synchronous)."""
    path = Path(db)
    conn = dbmod.open_sync(path, readonly=True)
    try:
        conn.execute("BEGIN")
        chain = [tuple(r) for r in conn.execute(rows.AUDIT_SELECT + " ORDER BY seq")]
        head = conn.execute(SQLITE.sql(HEAD), {"key": HEAD_KEY}).fetchone()
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise dbmod.translate(e, path) from e
    finally:
        conn.close()
    return auditmod.verify_rows(chain, head[0] if head else None, anchor)
