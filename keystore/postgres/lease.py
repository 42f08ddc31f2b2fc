"""Cluster-wide leases on disks: one read-write server per image across every host.

A lease is a session-level advisory lock, `pg_try_advisory_lock(LEASE_CLASS, disk id)`, held
by one connection for as long as the server runs: if the host crashes or its connection is
cut, PostgreSQL ends the session and the lock with it, so the next host can take over
without anyone cleaning up. The `leases` table says who holds it (host, pid, socket, since)
so a refused host can be told; the lock, not the row, is the truth (rows of sessions that
no longer exist are ignored and removed). Read-only servers take the lock shared: any number
of readers, or one writer.
"""

from __future__ import annotations

from typing import Any

import psycopg

from keystore.audit import now
from keystore.errors import Conflict

#: First key of the advisory lock ("vmsl"); the second is the disk's id.
LEASE_CLASS = 0x766D736C


class LeaseHeld(Conflict):
    """Another host (or process) holds the disk's lease."""


_LIVE = "backend IN (SELECT pid FROM pg_stat_activity)"


def try_take(
    conn: psycopg.Connection[Any], disk_id: int, disk: str, holder: str, *, readonly: bool
) -> bool:
    """Take the lease on this session (shared when `readonly`) or raise LeaseHeld naming
    the holders: one read-write server, or any number of read-only ones, never both.

    True when a holder this one excludes never released it (its row is still there: it died
    or lost its session); its server may still finish a request, so wait before serving."""
    fn = "pg_try_advisory_lock_shared" if readonly else "pg_try_advisory_lock"
    row = conn.execute(f"SELECT {fn}(%s, %s)".encode(), (LEASE_CLASS, disk_id)).fetchone()
    if not row or not row[0]:
        held = conn.execute(
            f"SELECT holder, since, readonly FROM leases WHERE disk_id = %s AND {_LIVE} "
            "ORDER BY since".encode(),
            (disk_id,),
        ).fetchall()
        mode = "read-only" if held and all(r[2] for r in held) else "read-write"
        who = "; ".join(f"{h} since {t}" for h, t, _ in held) or "another session"
        raise LeaseHeld(
            f"disk {disk} is already served {mode} by {who} (cluster-wide lease); "
            f"stop it there first (`vmshield disk stop {disk}` on that host)"
        )
    left = conn.execute(
        "SELECT count(*) FROM leases WHERE disk_id = %s AND (readonly = 0 OR NOT %s) "
        "AND backend <> pg_backend_pid()",
        (disk_id, readonly),
    ).fetchone()
    conn.execute(
        f"DELETE FROM leases WHERE disk_id = %s AND NOT {_LIVE}".encode(), (disk_id,)
    )  # rows of sessions that died
    conn.execute(
        "INSERT INTO leases (disk_id, holder, backend, since, readonly) "
        "VALUES (%s, %s, pg_backend_pid(), %s, %s)",
        (disk_id, holder, now().isoformat(), int(readonly)),
    )
    return bool(left and left[0])


def release(conn: psycopg.Connection[Any], disk_id: int) -> None:
    """Drop our lease row and our lock (shared or exclusive)."""
    row = conn.execute(
        "DELETE FROM leases WHERE disk_id = %s AND backend = pg_backend_pid() RETURNING readonly",
        (disk_id,),
    ).fetchone()
    fn = "pg_advisory_unlock_shared" if row and row[0] else "pg_advisory_unlock"
    conn.execute(f"SELECT {fn}(%s, %s)".encode(), (LEASE_CLASS, disk_id))
