"""The usbgate role as the attacker (issue #20 B10, B11, B12, C): a host's usbgate credential
must not be able to stop writes, fool the head guard, take disk leases or read the audit.

Real PostgreSQL; each test logs in as a role that is only a member of vmshield_usbgate.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
from typing import Any

import psycopg
import pytest
from argon2 import PasswordHasher

from keystore import audit as auditmod
from keystore.auth import AuthPolicy
from keystore.models import UsbAction
from keystore.postgres import audit as pgaudit
from keystore.postgres import connection as pgconn
from keystore.postgres.lease import LEASE_CLASS
from keystore.postgres.repository import PostgresRepository
from keystore.postgres.schema import MIGRATIONS, USBGATE_ROLE
from keystore.storage import rows as storage_rows
from keystore.storage.dialect import POSTGRES
from tests.support.postgres import Cluster

FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
DENIED = psycopg.errors.InsufficientPrivilege


def _keystore(cluster: Cluster) -> tuple[str, str]:
    """A seeded keystore's URL, as the superuser and as a login in the usbgate role."""
    url = cluster.keystore()

    async def seed() -> None:
        async with await PostgresRepository.open(url, policy=FAST) as repo:
            await repo.add_principal("alice", b"alice-password", actor="test")
            await repo.add_vm("web1", "alice", actor="test")
            await repo.add_usb_rule("web1", UsbAction.ALLOW, 0x0781, 0x5567, actor="test")

    asyncio.run(seed())
    with cluster.admin() as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'mallory_gate'").fetchone():
            conn.execute(f"CREATE ROLE mallory_gate LOGIN IN ROLE {USBGATE_ROLE}".encode())
    return url, url.replace("postgres@", "mallory_gate@")


def _head(url: str) -> tuple[int, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT seq, hash FROM audit_head").fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def _admin_write(url: str, n: int = 1) -> None:
    async def go() -> None:
        async with await PostgresRepository.open(url, policy=FAST) as repo:
            for _ in range(n):
                await repo.add_usb_rule("web1", UsbAction.BLOCK, 0x1234, 0x5678, actor="test")

    asyncio.run(go())


def test_usbgate_cannot_insert_a_row_at_a_future_seq(pg_cluster: Cluster) -> None:
    """B10: with INSERT on audit, a usb.* row at seq head+3 passed the trigger; when the chain
    reached that seq every write of every host failed (duplicate key), for good."""
    url, gate = _keystore(pg_cluster)
    seq, _ = _head(url)
    params = auditmod.next_row((seq + 2, "f" * 64), "usbgate", "usb.allowed", "web1", {})
    with psycopg.connect(gate, autocommit=True) as conn:
        with pytest.raises(DENIED):
            conn.execute(pgaudit.INSERT_SQL, storage_rows.audit_params(params))
        with pytest.raises(DENIED):
            conn.execute("UPDATE audit_head SET seq = seq + 1")
        # its one way in: the server computes seq and hash under the head lock
        entry = pgaudit.append_usbgate_sync(conn, "usb.allowed", "web1", {"vid_pid": "0781:5567"})
        assert (entry.seq, entry.actor) == (seq + 1, "usbgate")
    _admin_write(url, 4)  # past the seq the forged row would have taken
    checked = pgaudit.verify_sync(url)
    assert checked.ok, checked.problems
    assert checked.rows == seq + 5


def test_usbgate_rows_are_chained_by_the_server_exactly_as_python_verifies(
    pg_cluster: Cluster,
) -> None:
    """The server's JSON and SHA-256 must be Python's byte for byte (quotes, backslashes,
    control characters, non-ASCII, a character outside the BMP, a NULL vm)."""
    url, gate = _keystore(pg_cluster)
    awkward = {"product": 'Ünïcödé "stick" \\ \n\t\x01\x7f \u2603 \U0001f600', "n": 3}
    with psycopg.connect(gate, autocommit=True) as conn:
        a = pgaudit.append_usbgate_sync(conn, "usb.denied", "web1", awkward)
        b = pgaudit.append_usbgate_sync(conn, "usb.gateway.start", None, {})
        with pytest.raises(DENIED, match=r"only usb\.\* rows"):
            pgaudit.append_usbgate_sync(conn, "disk.destroy", "web1", {"disk": "web1-0"})
        with pytest.raises(psycopg.errors.DataError, match="JSON object"):
            conn.execute("SELECT * FROM vmshield_usbgate_audit('usb.x', NULL, '[1]')")
    assert a.detail == awkward and b.vm is None and b.seq == a.seq + 1
    checked = pgaudit.verify_sync(url)
    assert checked.ok, checked.problems


def test_temp_table_named_audit_does_not_fool_the_head_guard(pg_cluster: Cluster) -> None:
    """B11: the head guard looked up `audit` unqualified with the caller's search_path, where
    pg_temp comes first: a TEMP table named audit holding a made-up row let the usbgate role
    move the head onto a row that does not exist (every later verify failed)."""
    url, gate = _keystore(pg_cluster)
    seq, head = _head(url)
    attack = (
        ("CREATE TEMP TABLE audit (seq BIGINT, hash TEXT, prev_hash TEXT)", ()),
        ("INSERT INTO audit VALUES (%s, %s, %s)", (seq + 1, "e" * 64, head)),
        ("UPDATE audit_head SET seq = %s, hash = %s", (seq + 1, "e" * 64)),
    )
    with psycopg.connect(gate, autocommit=True) as conn:
        with pytest.raises(DENIED, match="temporary"):
            conn.execute(attack[0][0])
        with pytest.raises(DENIED):
            conn.execute(attack[2][0], attack[2][1])
    # and were TEMP and the head's UPDATE given back (schema 5's grants), the guard holds
    db = urllib.parse.urlsplit(url).path.lstrip("/")
    with pg_cluster.admin(db) as conn:
        conn.execute(f'GRANT TEMPORARY ON DATABASE "{db}" TO mallory_gate'.encode())
        conn.execute("GRANT SELECT, UPDATE ON audit_head TO mallory_gate")
        conn.execute("GRANT SELECT ON audit TO mallory_gate")
    with psycopg.connect(gate, autocommit=True) as conn:
        conn.execute(attack[0][0])
        conn.execute(attack[1][0], attack[1][1])
        with pytest.raises(DENIED, match="only onto the row it appended"):
            conn.execute(attack[2][0], attack[2][1])
    assert pgaudit.verify_sync(url).ok
    with psycopg.connect(url) as conn:  # and every function runs with a fixed search_path
        loose = conn.execute(
            "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace "
            "AND NOT coalesce(p.proconfig::text LIKE '%search_path=pg_catalog, pg_temp%', "
            "false)"
        ).fetchall()
    assert loose == []


_ADVISORY = (
    "pg_try_advisory_lock(%s, %s)",
    "pg_advisory_lock(%s, %s)",
    "pg_try_advisory_lock_shared(%s, %s)",
    "pg_advisory_xact_lock(%s, %s)",
    "pg_try_advisory_xact_lock_shared(%s, %s)",
)


def test_usbgate_role_cannot_take_lease_locks(pg_cluster: Cluster) -> None:
    """B12: pg_try_advisory_lock is PUBLIC: a usbgate login took the lease of every disk id
    (or the migration lock) and no host could serve."""
    url, gate = _keystore(pg_cluster)
    with psycopg.connect(gate, autocommit=True) as conn:
        for call in _ADVISORY:
            with pytest.raises(DENIED):
                conn.execute(f"SELECT {call}".encode(), (LEASE_CLASS, 1))
        with pytest.raises(DENIED):
            conn.execute("SELECT pg_try_advisory_lock(%s)", (0x766D7368,))
    with psycopg.connect(url, autocommit=True) as conn:  # the disk side still can
        assert conn.execute("SELECT pg_try_advisory_lock(%s, 1)", (LEASE_CLASS,)).fetchone() == (
            True,
        )


def test_usbgate_session_cannot_hold_the_audit_head(pg_cluster: Cluster) -> None:
    """B12: `SELECT ... FROM audit_head FOR UPDATE` in a transaction left open (timeouts off)
    stopped every write on every host. Now the head is out of the role's reach, and a session
    that stalls inside its own append is ended so that writers go on."""
    url, gate = _keystore(pg_cluster)
    attacker = psycopg.connect(gate)  # not autocommit: the attacker keeps the transaction
    try:
        with pytest.raises(DENIED):
            attacker.execute("SELECT seq FROM audit_head FOR UPDATE")
        attacker.rollback()
        attacker.execute("SET lock_timeout = 0")  # the session's own timeouts are its own
        attacker.execute("SET idle_in_transaction_session_timeout = 0")
        attacker.execute(pgaudit.USBGATE_APPEND_SQL, ("usb.allowed", "web1", "{}"))
        # the attacker now holds the head's row lock, idle in transaction
        done: dict[str, float] = {}

        def honest_usbgate() -> None:
            with psycopg.connect(gate, autocommit=True) as conn:
                pgaudit.append_usbgate_sync(conn, "usb.revoked", "web1", {})
            done["usbgate"] = time.monotonic()

        def admin() -> None:
            _admin_write(url)
            done["admin"] = time.monotonic()

        start = time.monotonic()
        writers = [threading.Thread(target=f) for f in (honest_usbgate, admin)]
        for w in writers:
            w.start()
        for w in writers:
            w.join(60)
        assert set(done) == {"usbgate", "admin"}, f"only {done} went on within 60 s"
        waited = {k: round(t - start, 2) for k, t in done.items()}
        print(f"\nwrites behind a stalled usbgate session completed after (s): {waited}")
        assert max(waited.values()) < 15
        with pytest.raises(psycopg.OperationalError):
            attacker.execute("SELECT 1")
    finally:
        attacker.close()
    checked = pgaudit.verify_sync(url)
    assert checked.ok, checked.problems


def test_usbgate_role_reads_its_rules_not_the_audit(pg_cluster: Cluster) -> None:
    """C: the usbgate role could SELECT the whole audit table (every user's actions) and the
    VMs' owners; it needs the rules and the VMs' names only."""
    _url, gate = _keystore(pg_cluster)
    with psycopg.connect(gate, autocommit=True) as conn:
        for sql in ("SELECT * FROM audit", "SELECT * FROM audit_head", "SELECT owner FROM vms",
                    "SELECT * FROM leases", "SELECT created FROM usb_rules"):  # fmt: skip
            with pytest.raises(DENIED):
                conn.execute(sql.encode())
        rows = conn.execute(
            POSTGRES.sql(storage_rows.RULES), {"vm": "web1"}
        ).fetchall()  # what the listener reads
    assert [storage_rows.usb_rule(r).vendor_id for r in rows] == [0x0781]


def _at_schema_5(cluster: Cluster) -> str:
    """A database migrated to schema 5 only, with a chain of three rows written then."""
    url = cluster.url(cluster.create_database(template="template1"))
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (5)")
        for migration in MIGRATIONS[:5]:
            conn.execute(migration.encode())
        last: Any = None
        for i in range(3):
            params = auditmod.next_row(last, "alice@cli", "vm.add", f"vm{i}", {"i": i})
            conn.execute(pgaudit.INSERT_SQL, storage_rows.audit_params(params))
            conn.execute("UPDATE audit_head SET seq = %s, hash = %s", (params[0], params[7]))
            last = (params[0], params[7])
    return url


def test_a_schema_5_keystore_is_upgraded_in_place(pg_cluster: Cluster) -> None:
    url = _at_schema_5(pg_cluster)
    assert pgconn.initialise(url)[1] == 5
    with pg_cluster.admin() as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'mallory_gate'").fetchone():
            conn.execute(f"CREATE ROLE mallory_gate LOGIN IN ROLE {USBGATE_ROLE}".encode())
    with psycopg.connect(url.replace("postgres@", "mallory_gate@"), autocommit=True) as conn:
        assert pgaudit.append_usbgate_sync(conn, "usb.allowed", "vm1", {}).seq == 4
        for sql in ("SELECT * FROM audit", "CREATE TEMP TABLE t (x INT)",
                    "SELECT pg_try_advisory_lock(1)"):  # fmt: skip
            with pytest.raises(DENIED):
                conn.execute(sql.encode())
    checked = pgaudit.verify_sync(url)
    assert checked.ok and checked.rows == 4, checked.problems
