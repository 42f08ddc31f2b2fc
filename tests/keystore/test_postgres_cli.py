"""`vmshield --db postgresql://...`: the CLI on the PostgreSQL backend, and `keystore migrate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner, Result

from keystore.auth import AuthPolicy
from keystore.cli import main
from keystore.postgres import audit as pgaudit
from keystore.sqlite import repository as sqlite_repo
from tests.support.postgres import Cluster

PW = "s3cret-horse-battery"
FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)


def vms(*args: str, input: str | None = None, code: int = 0, env: Any = None) -> Result:
    result = CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def _populate(db: str) -> None:
    vms("--help")
    vms("init", "--db", db)
    vms("user", "add", "alice", "--db", db, input=PW + "\n")
    vms("vm", "add", "web1", "--owner", "alice", "--db", db)
    vms("usb", "allow", "web1", "0781:5567", "--db", db)
    vms("usb", "block", "web1", "*:*", "--db", db)


def test_cli_on_postgres_from_the_environment(pg_cluster: Cluster) -> None:
    url = pg_cluster.url(pg_cluster.create_database(template="template1"))
    assert "created keystore" in vms("init", env={"VMSHIELD_DB": url}).output
    assert "up to date" in vms("init", env={"VMSHIELD_DB": url}).output
    _populate(url)
    rules = json.loads(vms("usb", "list", "web1", "--json", "--db", url).output)
    assert [r["action"] for r in rules] == ["allow", "block"]
    out = vms("audit", "verify", "--db", url).output
    assert out.startswith("ok: 5 rows")  # init, user, vm, 2 rules
    assert "alice" in vms("user", "list", env={"VMSHIELD_DB": url}).output
    # a command that needs a local file says so instead of mangling the URL
    r = vms("disk", "create", "web1", "--size", "1M", "--db", url, code=2, input=PW + "\n")
    assert "needs a local keystore file" in r.output


def test_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    url = f"postgresql://nobody@/vmshield?host={tmp_path}"
    r = vms("vm", "list", "--db", url, code=1)
    assert r.output.startswith(f"Error: cannot use keystore {url}")
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_migrate_copies_verifies_and_refuses_twice(pg_cluster: Cluster, tmp_path: Path) -> None:
    source = tmp_path / "ks.db"
    _populate(str(source))
    before = vms("audit", "verify", "--db", str(source)).output.split("head ")[1].strip()
    url = pg_cluster.url(pg_cluster.create_database(template="template1"))
    r = vms("keystore", "migrate", "--to", url, "--db", str(source), "--json")
    report = json.loads(r.output)
    assert report["ok"] and report["source_head"] == before
    assert report["rows"] == {
        "principals": 1, "vms": 1, "disks": 0, "servers": 0, "erase_permissions": 1,
        "usb_rules": 2, "audit": 5,
    }  # fmt: skip
    # the copied chain verifies in PostgreSQL and still contains the SQLite head
    assert pgaudit.verify_sync(url, anchor=before).ok
    assert vms("audit", "verify", "--db", url, "--anchor", before).output.startswith("ok: 6 rows")
    # the same users authenticate (the argon2id verifier was copied, nothing else)
    vms("vm", "add", "web2", "--owner", "alice", "--db", url)
    listed = vms("usb", "list", "web1", "--db", url).output
    assert "0781:5567" in listed
    # new rows get fresh ids: the identity sequences moved past the copied ones
    vms("usb", "allow", "web2", "1234:5678", "--db", url)
    r = vms("keystore", "migrate", "--to", url, "--db", str(source), code=1)
    assert "already migrated" in r.output
    # a target that holds another keystore is refused too
    other = pg_cluster.url(pg_cluster.create_database(template="template1"))
    _populate(other)
    r = vms("keystore", "migrate", "--to", other, "--db", str(source), code=1)
    assert "already holds a keystore" in r.output


def test_migrate_refuses_a_broken_source_chain(pg_cluster: Cluster, tmp_path: Path) -> None:
    import sqlite3

    source = tmp_path / "ks.db"
    _populate(str(source))
    with sqlite3.connect(source) as conn:
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    url = pg_cluster.url(pg_cluster.create_database(template="template1"))
    r = vms("keystore", "migrate", "--to", url, "--db", str(source), code=1)
    assert "does not verify, nothing copied" in r.output and "row 2" in r.output
