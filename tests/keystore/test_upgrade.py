"""Keystores made by the code before the storage layer (commit ce90f6a) open with this one.

The dumps in data/ were written by that commit's vmshield (data/make_upgrade_fixtures.py):
an SQLite keystore at schema 3 and a PostgreSQL one at schema 7. Restored as they were, each
is initialised by today's `vmshield init`, then read and written through today's repository:
every row reads back as it was written, the audit chain verifies on the head the old code
recorded, and new writes chain onto it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
from pathlib import Path

from click.testing import CliRunner

from keystore.auth import AuthPolicy
from keystore.cli import main
from keystore.errors import AuthenticationFailed
from keystore.models import DiskState, UsbAction
from keystore.postgres import audit as pgaudit
from keystore.postgres import connection as pgconn
from keystore.postgres.repository import PostgresRepository
from keystore.repository import Repository
from keystore.sqlite import audit as sqlaudit
from keystore.sqlite.repository import SqliteRepository
from scripts.lab.tempcluster import pg_bindir
from tests.support.postgres import Cluster

DATA = Path(__file__).parent / "data"
PASSWORD = b"correct horse battery staple"
POLICY = AuthPolicy()  # the dumps' verifiers are cheap: a login rehashes with this policy
UUID = "0f0e0d0c-0b0a-4908-8706-050403020100"


def _old_head(dump: Path) -> tuple[int, str]:
    """The last audit row (seq, hash) the old code wrote, read from the dump itself."""
    rows = re.findall(
        r"INSERT INTO (?:\"audit\"|public\.audit) VALUES ?\((\d+),.*'([0-9a-f]{64})'\);",
        dump.read_text(),
    )
    seq, h = rows[-1]
    return int(seq), h


async def _check(repo: Repository, head: tuple[int, str]) -> None:
    # every row as the old code wrote it
    alice, bob = await repo.list_principals()
    assert (alice.name, alice.failed_attempts, bob.name, bob.failed_attempts) == (
        "alice", 0, "bob", 1,
    )  # fmt: skip
    (vm,) = await repo.list_vms()
    assert (vm.uuid, vm.name, vm.owner, vm.unlock) == (UUID, "web1", "alice", "network")
    disk = await repo.get_disk("web1-0")
    assert (disk.vm, disk.path, disk.format, disk.size, disk.state) == (
        "web1", "/srv/vmshield/web1-0.img", "luks2", 1 << 30, DiskState.READY,
    )  # fmt: skip
    assert (disk.luks_uuid, disk.st_dev, disk.st_ino) == (
        "6a1f0c3e-2d7b-4c4e-9a55-0123456789ab", 2049, 1 << 40,
    )  # fmt: skip
    (server,) = await repo.list_servers()
    assert (server.disk, server.pid, server.readonly) == ("web1-0", 4242, False)
    perm = await repo.get_erase_permission("web1")
    assert (perm.deep_erase, perm.normal_delete) == (True, True)
    rules = await repo.list_usb_rules("web1")
    assert [(r.position, r.action, r.device_class, r.vendor_id, r.serial) for r in rules] == [
        (1, UsbAction.BLOCK, 0x08, None, None),
        (2, UsbAction.ALLOW, None, 0x0781, "4C530001"),
    ]
    entries = await repo.list_audit()
    assert [e.seq for e in entries] == list(range(1, head[0] + 1))
    assert entries[-1].hash == head[1]
    checked = await repo.verify_audit(anchor=f"{head[0]}:{head[1]}")
    assert checked.ok, checked.problems
    assert (checked.head_seq, checked.head_hash) == head

    # and it takes new writes, chained onto the old head
    await repo.authenticate("alice", PASSWORD, actor="alice@cli")
    with contextlib.suppress(AuthenticationFailed):
        await repo.authenticate("bob", b"wrong again", actor="bob@cli")
    assert (await repo.get_principal("bob")).failed_attempts == 2
    rule = await repo.add_usb_rule("web1", UsbAction.REJECT, 0x1234, None, actor="t", position=2)
    assert [r.id for r in await repo.list_usb_rules("web1")][1] == rule.id
    assert rule.id > max(r.id for r in rules)  # the id sequence goes on after the old rows
    await repo.remove_usb_rule("web1", 1, actor="t")
    await repo.set_disk_state("web1-0", DiskState.DESTROYING, actor="t", expect=DiskState.READY)
    disk2 = await repo.add_disk("web1", "web1-1", "/srv/vmshield/web1-1.img", fmt="luks2",
                                cipher="aes-xts-plain64", size=1 << 20, actor="t")  # fmt: skip
    assert disk2.id > disk.id
    after = await repo.verify_audit(anchor=f"{head[0]}:{head[1]}")
    assert after.ok, after.problems
    assert after.head_seq == head[0] + 6


def test_an_sqlite_keystore_of_schema_3_opens_reads_and_writes(tmp_path: Path) -> None:
    dump = DATA / "keystore-ce90f6a.sqlite.sql"
    db = tmp_path / "keystore.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(dump.read_text())
    db.chmod(0o600)
    head = _old_head(dump)

    got = CliRunner().invoke(main, ["init", "--db", str(db)])
    assert got.exit_code == 0, got.output
    assert "up to date (schema version 3)" in got.output

    async def go() -> None:
        async with await SqliteRepository.open(db, policy=POLICY) as repo:
            await _check(repo, head)

    asyncio.run(go())
    sqlaudit.append_audit(db, "usbgate", "usb.allowed", "web1", {"vid_pid": "1234:0001"})
    assert sqlaudit.verify(db, anchor=f"{head[0]}:{head[1]}").ok


def test_a_postgres_keystore_of_schema_7_opens_reads_and_writes(pg_cluster: Cluster) -> None:
    dump = DATA / "keystore-ce90f6a.pg.sql"
    url = pg_cluster.url(pg_cluster.create_database(template="template1"))
    subprocess.run(
        [str(pg_bindir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(dump), url],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    head = _old_head(dump)
    assert pgconn.initialise(url) == (False, 7)

    async def go() -> None:
        async with await PostgresRepository.open(url, policy=POLICY) as repo:
            await _check(repo, head)

    asyncio.run(go())
    with pgconn.connect_sync(url) as conn:  # the usbgate role's server-side append
        pgaudit.append_usbgate_sync(conn, "usb.allowed", "web1", {"vid_pid": "1234:0001"})
    assert pgaudit.verify_sync(url, anchor=f"{head[0]}:{head[1]}").ok
