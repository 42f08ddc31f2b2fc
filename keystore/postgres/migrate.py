"""Copying an SQLite keystore into PostgreSQL, row for row, audit chain included.

The audit rows keep their seq, timestamps and hashes, so the chain that verified in SQLite
verifies in PostgreSQL with the same head; a `keystore.migrate` row is then chained onto it.
Refused when the SQLite chain does not verify, when the target already holds a keystore
(any user, VM or audit row), and so when run twice. Everything is one transaction: a failure
leaves the target as it was.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from keystore import audit as auditmod
from keystore.errors import Conflict, KeystoreError
from keystore.location import redact
from keystore.postgres import audit as pgaudit
from keystore.postgres import connection as pgconn
from keystore.sqlite import audit as sqlaudit
from keystore.sqlite import connection as sqlconn
from keystore.storage import rows as storage_rows
from keystore.storage.dialect import SQLITE

#: Parents before children (foreign keys); the audit table is copied separately.
TABLES = ("principals", "vms", "disks", "servers", "erase_permissions", "usb_rules")
_IDENTITY = ("disks", "usb_rules")
MIGRATED_KEY = "migrated_from"


class MigrationRefused(KeystoreError):
    """The source does not verify, or the target is not an empty keystore."""


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    rows: dict[str, int]
    source_head: str
    target: auditmod.VerifyResult


def _read_sqlite(path: Path) -> tuple[dict[str, tuple[list[str], list[tuple[Any, ...]]]], Any]:
    """Every table's (columns, rows) and the verification of its chain, from one snapshot."""
    conn = sqlconn.open_sync(path, readonly=True)
    try:
        conn.execute("BEGIN")
        data: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
        for table in (*TABLES, "audit"):
            order = "seq" if table == "audit" else "rowid"
            cur = conn.execute(f"SELECT * FROM {table} ORDER BY {order}")
            data[table] = ([d[0] for d in cur.description], [tuple(r) for r in cur])
        head = conn.execute(SQLITE.sql(sqlaudit.HEAD), {"key": sqlaudit.HEAD_KEY}).fetchone()
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise sqlconn.translate(e, path) from e
    finally:
        conn.close()
    cols, rows = data["audit"]
    audit_rows = [tuple(r[cols.index(c)] for c in storage_rows.AUDIT_COLUMNS) for r in rows]
    return data, auditmod.verify_rows(audit_rows, head[0] if head else None)


def migrate(source: Path, url: str, *, actor: str) -> MigrationResult:
    """Copy the SQLite keystore at `source` into the (empty or new) database at `url`."""
    data, checked = _read_sqlite(source)
    if not checked.ok:
        raise MigrationRefused(
            f"the audit chain of {source} does not verify, nothing copied: "
            + "; ".join(checked.problems)
        )
    pgconn.initialise(url)
    conn = pgconn.connect_sync(url)
    source_head = f"{checked.head_seq}:{checked.head_hash}"
    try:
        with conn.transaction():
            head = conn.execute(pgaudit.LOCK_HEAD_SQL).fetchone()
            done = conn.execute("SELECT value FROM meta WHERE key = %s", (MIGRATED_KEY,)).fetchone()
            if done:
                raise MigrationRefused(f"{redact(url)} was already migrated: {done[0]}")
            busy = conn.execute(
                "SELECT (SELECT count(*) FROM principals) + (SELECT count(*) FROM vms)"
            ).fetchone()
            if pgaudit.last_of(head) is not None or (busy and busy[0]):
                raise MigrationRefused(
                    f"{redact(url)} already holds a keystore; migrate into an empty one"
                )
            counts = {t: _copy(conn, t, *data[t]) for t in TABLES}
            counts["audit"] = _copy(conn, "audit", *data["audit"])
            for table in _IDENTITY:
                conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)".encode()
                )
            if checked.rows:
                pgaudit.set_head_sync(conn, checked.head_seq, checked.head_hash)
            note = f"{source.absolute()} at audit head {source_head}"
            conn.execute("INSERT INTO meta VALUES (%s, %s)", (MIGRATED_KEY, note))
        pgaudit.append_sync(
            conn, actor, "keystore.migrate", None,
            {"from": str(source.absolute()), "source_head": source_head, "rows": counts},
        )  # fmt: skip
    except psycopg.errors.IntegrityError as e:
        raise Conflict(f"cannot copy {source}: {str(e).splitlines()[0]}") from e
    except psycopg.Error as e:
        raise pgconn.translate(e, url) from e
    finally:
        conn.close()
    target = pgaudit.verify_sync(url, anchor=source_head if checked.rows else None)
    return MigrationResult(counts, source_head, target)


def _copy(
    conn: psycopg.Connection[Any], table: str, cols: list[str], rows: list[tuple[Any, ...]]
) -> int:
    if rows:
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
        with conn.cursor() as cur:
            cur.executemany(sql.encode(), rows)
    return len(rows)
