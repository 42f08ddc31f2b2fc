"""Write the keystores that test_upgrade.py opens: made by vmshield at commit ce90f6a.

Not run by the tests: it made the committed dumps next to it, with that commit's code:

    git archive ce90f6a keystore usbgate nbd_plugin | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old .venv/bin/python tests/keystore/data/make_upgrade_fixtures.py

keystore-ce90f6a.sqlite.sql is the SQLite keystore (schema 3) as `iterdump` text plus its
user_version; keystore-ce90f6a.pg.sql is `pg_dump` of the PostgreSQL keystore (schema 7).
Both hold the same users, VM, disk, server, permission, USB rules, a failed login and the
audit rows those wrote. The verifiers use cheap argon2 parameters (the password is
PASSWORD below).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

import keystore
from keystore import audit
from keystore.auth import AuthPolicy
from keystore.errors import AuthenticationFailed
from keystore.models import DiskState, UsbAction
from keystore.sqlite import connection as dbmod
from keystore.sqlite.repository import SqliteRepository

PASSWORD = b"correct horse battery staple"
FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
HERE = Path(__file__).parent


async def fill(repo: Any) -> None:
    await repo.add_principal("alice", PASSWORD, actor="admin@cli")
    await repo.add_principal("bob", PASSWORD, actor="admin@cli")
    await repo.add_vm(
        "web1", "alice", actor="admin@cli", uuid="0f0e0d0c-0b0a-4908-8706-050403020100"
    )
    await repo.add_disk(
        "web1", "web1-0", "/srv/vmshield/web1-0.img", fmt="luks2",
        cipher="aes-xts-plain64", size=1 << 30, actor="admin@cli",
    )  # fmt: skip
    await repo.set_disk_identity(
        "web1-0", luks_uuid="6a1f0c3e-2d7b-4c4e-9a55-0123456789ab", st_dev=2049,
        st_ino=1 << 40, actor="admin@cli",
    )  # fmt: skip
    await repo.set_disk_state("web1-0", DiskState.READY, actor="admin@cli")
    await repo.record_server(
        "web1-0", socket="/run/vmshield/web1-0.sock", pidfile="/run/vmshield/web1-0.pid",
        pid=4242, readonly=False, actor="admin@cli",
    )  # fmt: skip
    await repo.set_erase_permission("web1", actor="admin@cli", normal_delete=True)
    await repo.set_unlock_policy("web1", "network", actor="admin@cli")
    await repo.add_usb_rule("web1", UsbAction.ALLOW, 0x0781, 0x5567, actor="admin@cli",
                            serial="4C530001")  # fmt: skip
    await repo.add_usb_rule(
        "web1", UsbAction.BLOCK, None, None, actor="admin@cli", device_class=0x08,
        position=1,
    )  # fmt: skip
    with contextlib.suppress(AuthenticationFailed):
        await repo.authenticate("bob", b"wrong", actor="bob@cli")


def make_sqlite(tmp: Path) -> None:
    db = tmp / "keystore.db"
    dbmod.initialise(db)
    audit.append_audit(db, "admin@cli", "keystore.init", None, {"schema": 3})

    async def go() -> None:
        async with await SqliteRepository.open(db, policy=FAST) as repo:
            await fill(repo)

    asyncio.run(go())
    audit.append_audit(db, "usbgate", "usb.allowed", "web1", {"vid_pid": "0781:5567"})
    with sqlite3.connect(db) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        text = "\n".join(conn.iterdump())
    (HERE / "keystore-ce90f6a.sqlite.sql").write_text(
        f"-- made by tests/keystore/data/make_upgrade_fixtures.py at ce90f6a\n"
        f"{text}\nPRAGMA user_version = {version};\n"
    )


def make_postgres() -> None:
    from keystore.postgres import audit as pgaudit
    from keystore.postgres import connection as pgconn
    from keystore.postgres.repository import PostgresRepository
    from scripts.lab.tempcluster import pg_bindir, running_cluster

    with running_cluster() as cluster:
        name = cluster.create_database("old", template="template1")
        url = cluster.url(name)
        pgconn.initialise(url)
        with pgconn.connect_sync(url) as conn:
            pgaudit.append_sync(conn, "admin@cli", "keystore.init", None, {"schema": 7})

        async def go() -> None:
            async with await PostgresRepository.open(url, policy=FAST) as repo:
                await fill(repo)

        asyncio.run(go())
        with pgconn.connect_sync(url) as conn:
            pgaudit.append_usbgate_sync(conn, "usb.allowed", "web1", {"vid_pid": "0781:5567"})
        dump = subprocess.run(
            [str(pg_bindir() / "pg_dump"), "--no-owner", "--inserts", url],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    (HERE / "keystore-ce90f6a.pg.sql").write_text(
        "-- made by tests/keystore/data/make_upgrade_fixtures.py at ce90f6a\n" + dump
    )


if __name__ == "__main__":
    if not (
        Path(keystore.__file__).parent.parent / "keystore" / "sqlite" / "principals.py"
    ).exists():
        sys.exit("run this with PYTHONPATH=<a checkout of ce90f6a> (see the docstring)")
    with tempfile.TemporaryDirectory() as d:
        make_sqlite(Path(d))
    make_postgres()
