"""Cluster-wide leases on disks: one read-write server per image across every host.

A lease is a session-level advisory lock, `pg_try_advisory_lock(LEASE_CLASS, disk id)`, held
by one connection for as long as the server runs: if the host crashes or its connection is
cut, PostgreSQL ends the session and the lock with it, so the next host can take over
without anyone cleaning up. The `leases` table says who holds it (host, pid, socket, since)
so a refused host can be told; the lock, not the row, is the truth (a row left by a crashed
holder is overwritten by the next one).
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


def try_take(conn: psycopg.Connection[Any], disk_id: int, disk: str, holder: str) -> None:
    """Take the lease on this session or raise LeaseHeld naming the holder."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LEASE_CLASS, disk_id)).fetchone()
    if not row or not row[0]:
        held = conn.execute(
            "SELECT holder, since FROM leases WHERE disk_id = %s", (disk_id,)
        ).fetchone()
        who = f"{held[0]} since {held[1]}" if held else "another session"
        raise LeaseHeld(
            f"disk {disk} is already served read-write by {who} (cluster-wide lease); "
            f"stop it there first (`vmshield disk stop {disk}` on that host)"
        )
    conn.execute(
        "INSERT INTO leases VALUES (%s, %s, pg_backend_pid(), %s) ON CONFLICT (disk_id) DO "
        "UPDATE SET holder = EXCLUDED.holder, backend = EXCLUDED.backend, since = EXCLUDED.since",
        (disk_id, holder, now().isoformat()),
    )


def release(conn: psycopg.Connection[Any], disk_id: int) -> None:
    """Drop the lease row (if it is still ours) and the lock."""
    conn.execute("DELETE FROM leases WHERE disk_id = %s AND backend = pg_backend_pid()", (disk_id,))
    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LEASE_CLASS, disk_id))
