"""The repository contract on the PostgreSQL backend, plus PostgreSQL-specific behaviour."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.errors import DatabaseUnavailable
from keystore.models import UsbAction
from keystore.postgres import audit as pgaudit
from keystore.postgres import connection as pgconn
from keystore.postgres.repository import PostgresRepository
from keystore.postgres.schema import ADMIN_ROLE, SCHEMA_VERSION, USBGATE_ROLE
from tests.support.keystore_contract import RepositoryContract
from tests.support.postgres import Cluster

FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


class TestPostgresRepository(RepositoryContract):
    @pytest.fixture
    def make_repo(self, pg_cluster: Cluster) -> Callable[..., Any]:
        url = pg_cluster.keystore()

        async def make(clock: Any = None) -> PostgresRepository:
            kwargs = {"clock": clock} if clock else {}
            return await PostgresRepository.open(url, policy=FAST, **kwargs)

        return make


def _login_role(cluster: Cluster, name: str, member_of: str) -> None:
    with cluster.admin() as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE {member_of}'.encode())


def _seed(url: str) -> None:
    async def go() -> None:
        async with await PostgresRepository.open(url, policy=FAST) as repo:
            await repo.add_principal("alice", b"alice-password", actor="test")
            await repo.add_vm("web1", "alice", actor="test")
            await repo.add_usb_rule("web1", UsbAction.ALLOW, 0x0781, 0x5567, actor="test")

    asyncio.run(go())


def test_usbgate_role_reads_rules_appends_audit_but_cannot_change_rules_or_users(
    pg_cluster: Cluster,
) -> None:
    url = pg_cluster.keystore()
    _seed(url)
    _login_role(pg_cluster, "host_b_usbgate", USBGATE_ROLE)
    gate_url = url.replace("postgres@", "host_b_usbgate@")
    with pgconn.connect_sync(gate_url) as conn:
        assert conn.execute("SELECT count(*) FROM usb_rules").fetchone() == (1,)
        pgaudit.append_usbgate_sync(conn, "usb.allowed", "web1", {"vid_pid": "0781:5567"})
        refused = [
            "UPDATE usb_rules SET action = 'block'",
            "DELETE FROM usb_rules",
            "INSERT INTO usb_rules (vm_uuid, position, action, created) "
            "SELECT uuid, 2, 'allow', 'now' FROM vms",
            "UPDATE principals SET verifier = 'x'",
            "SELECT verifier FROM principals",
            "UPDATE vms SET owner = 'mallory'",
            "UPDATE audit SET actor = 'nobody'",
        ]
        for sql in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.encode())
    assert pgaudit.verify_sync(url).ok


def test_usbgate_role_cannot_forge_audit_rows_of_others(pg_cluster: Cluster) -> None:
    """The usbgate role computed the hash chain itself and had INSERT on audit: a usbgate host
    wrote a valid row "alice: disk.destroy web1-0" (or any actor's) that verify accepted.
    Since schema 6 the server writes its rows, always as actor usbgate, only usb.* actions."""
    url = pg_cluster.keystore()
    _seed(url)
    _login_role(pg_cluster, "host_c_usbgate", USBGATE_ROLE)
    gate_url = url.replace("postgres@", "host_c_usbgate@")
    with pgconn.connect_sync(gate_url) as conn:
        for actor, action in (("alice", "disk.destroy"), ("usbgate", "disk.destroy"),
                              ("alice", "usb.allowed")):  # fmt: skip
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                pgaudit.append_sync(conn, actor, action, "web1", {"disk": "web1-0"})
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only usb"):
            pgaudit.append_usbgate_sync(conn, "disk.destroy", "web1", {"disk": "web1-0"})
        pgaudit.append_usbgate_sync(conn, "usb.revoked", "web1", {"vid_pid": "0781:5567"})
        for sql in ("UPDATE audit_head SET seq = seq + 5",  # a head past the rows: verify fails
                    "UPDATE audit_head SET hash = repeat('f', 64)"):  # fmt: skip
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="audit_head"):
                conn.execute(sql.encode())
            conn.rollback()
    rows = asyncio.run(_actions(url))
    assert ("alice", "disk.destroy") not in rows and ("usbgate", "usb.revoked") in rows
    assert pgaudit.verify_sync(url).ok


async def _actions(url: str) -> list[tuple[str, str]]:
    async with await PostgresRepository.open(url, policy=FAST) as repo:
        return [(e.actor, e.action) for e in await repo.list_audit(limit=50)]


def test_audit_rows_cannot_be_changed_even_by_the_owner(pg_cluster: Cluster) -> None:
    url = pg_cluster.keystore()
    _seed(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for sql in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(sql.encode())


def test_edited_chain_is_detected(pg_cluster: Cluster) -> None:
    url = pg_cluster.keystore()
    _seed(url)
    with psycopg.connect(url, autocommit=True) as conn:  # an attacker with DDL rights
        conn.execute("ALTER TABLE audit DISABLE TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    result = pgaudit.verify_sync(url)
    assert not result.ok and "row 2: content does not match" in result.problems[0]


def test_uninitialised_database_and_password_urls_are_refused(pg_cluster: Cluster) -> None:
    empty = pg_cluster.url(pg_cluster.create_database(template="template1"))
    with pytest.raises(DatabaseUnavailable, match=r"schema version 0.*vmshield init --db"):
        pgconn.connect_sync(empty)
    with pytest.raises(ValueError, match="password in the URL") as e:
        pgconn.connect_sync(empty.replace("postgres@", "postgres:hunter2@"))
    assert "hunter2" not in str(e.value)
    missing = pg_cluster.url("no_such_db")
    with pytest.raises(DatabaseUnavailable, match="no_such_db"):
        asyncio.run(PostgresRepository.open(missing))
    created, old = pgconn.initialise(empty)
    assert (created, old) == (True, 0)
    assert pgconn.initialise(empty) == (False, SCHEMA_VERSION)


def test_concurrent_appends_from_8_writers_keep_one_chain(pg_cluster: Cluster) -> None:
    """8 writers (own connections, as 8 hosts would have) append at once: one linear chain."""
    url = pg_cluster.keystore()
    writers, each = 8, 60
    barrier = threading.Barrier(writers)

    def writer(n: int) -> None:
        with pgconn.connect_sync(url) as conn:
            barrier.wait()
            for i in range(each):
                pgaudit.append_sync(conn, f"host{n}", "usb.allowed", f"vm{n}", {"i": i})

    start = time.perf_counter()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    result = pgaudit.verify_sync(url)
    print(f"\n{writers} concurrent writers: {writers * each / elapsed:.0f} appends/s")
    assert result.ok, result.problems
    assert result.rows == writers * each
    with psycopg.connect(url) as conn:
        per_host = dict(conn.execute("SELECT actor, count(*) FROM audit GROUP BY actor"))
    assert per_host == {f"host{n}": each for n in range(writers)}


def test_admin_role_runs_the_cli_operations(pg_cluster: Cluster) -> None:
    """A login in vmshield_admin (not a superuser) can do what the CLI does."""
    url = pg_cluster.keystore()
    _login_role(pg_cluster, "ops_alice", ADMIN_ROLE)
    admin_url = url.replace("postgres@", "ops_alice@")
    _seed(admin_url)

    async def more() -> None:
        async with await PostgresRepository.open(admin_url, policy=FAST) as repo:
            await repo.add_disk("web1", "web1-0", "/srv/web1-0.img", fmt="luks2",
                                cipher="aes-xts-plain64", size=1 << 20, actor="test")  # fmt: skip
            await repo.set_erase_permission("web1", normal_delete=True, actor="test")
            await repo.remove_usb_rule("web1", 1, actor="test")
            assert (await repo.verify_audit()).ok

    asyncio.run(more())
    with psycopg.connect(admin_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM audit")


def test_an_older_schema_is_upgraded_by_init(pg_cluster: Cluster) -> None:
    from keystore.postgres.schema import MIGRATIONS

    url = pg_cluster.url(pg_cluster.create_database(template="template1"))
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute(MIGRATIONS[0].encode())
    with pytest.raises(DatabaseUnavailable, match="schema version 1, expected"):
        pgconn.connect_sync(url)
    assert pgconn.initialise(url) == (False, 1)
    with pgconn.connect_sync(url) as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (
            SCHEMA_VERSION,
        )
