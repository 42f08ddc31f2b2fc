"""The repository contract on the SQLite backend, plus SQLite-specific behaviour."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.errors import DatabaseUnavailable
from keystore.sqlite import connection as dbmod
from keystore.sqlite.repository import SqliteRepository
from keystore.sqlite.schema import SCHEMA_VERSION
from tests.support.keystore_contract import RepositoryContract

#: cheap argon2id parameters so the suite stays fast (production: RFC 9106 profile)
FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


class TestSqliteRepository(RepositoryContract):
    @pytest.fixture
    def make_repo(self, tmp_path: Path) -> Callable[..., Any]:
        path = tmp_path / "ks.db"
        dbmod.initialise(path)

        async def make(clock: Any = None) -> SqliteRepository:
            kwargs = {"clock": clock} if clock else {}
            return await SqliteRepository.open(path, policy=FAST, **kwargs)

        return make


class TestBlockingSqliteRepository(RepositoryContract):
    """The same contract on the blocking connection the USB rule commands use (no event loop
    there; here one runs only for the password operations' threads)."""

    @pytest.fixture
    def make_repo(self, tmp_path: Path) -> Callable[..., Any]:
        path = tmp_path / "ks.db"
        dbmod.initialise(path)

        async def make(clock: Any = None) -> SqliteRepository:
            kwargs = {"clock": clock} if clock else {}
            return SqliteRepository.open_blocking(path, policy=FAST, **kwargs)

        return make


def test_created_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ks.db"
    old = os.umask(0)  # a permissive umask must not matter: mode is set at creation
    try:
        created, version = dbmod.initialise(path)
    finally:
        os.umask(old)
    assert created and version == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    for side in ("-wal", "-shm"):
        p = Path(str(path) + side)
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_initialise_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "ks.db"
    assert dbmod.initialise(path) == (True, 0)
    assert dbmod.initialise(path) == (False, SCHEMA_VERSION)


def test_foreign_sqlite_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(DatabaseUnavailable, match="not a vmshield keystore"):
        dbmod.initialise(path)


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "ks.db"
    dbmod.initialise(path)
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(DatabaseUnavailable, match="upgrade vmshield"):
        dbmod.initialise(path)


def test_missing_db_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "ks.db"
    with pytest.raises(DatabaseUnavailable) as exc:
        dbmod.open_sync(path)
    assert str(path) in str(exc.value) and "does not exist" in str(exc.value)


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    path = tmp_path / "f" / "ks.db"
    with pytest.raises(DatabaseUnavailable) as exc:
        dbmod.initialise(path)
    assert str(path) in str(exc.value) and "not a directory" in str(exc.value)


def test_older_schema_is_migrated_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    path = tmp_path / "ks.db"
    dbmod.initialise(path)
    v2 = "ALTER TABLE vms ADD COLUMN note TEXT;\nCREATE INDEX vms_owner ON vms(owner);\n"
    monkeypatch.setattr(dbmod, "MIGRATIONS", (*dbmod.MIGRATIONS, v2))
    monkeypatch.setattr(dbmod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    async def go() -> None:
        async with await SqliteRepository.open(path, policy=FAST) as r:
            await r.add_principal("alice", b"password-1", actor="t")

    asyncio.run(go())
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        cols = [row[1] for row in c.execute("PRAGMA table_info(vms)")]
    assert "note" in cols
    assert dbmod.initialise(path) == (False, SCHEMA_VERSION + 1)


def test_failed_migration_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ks.db"
    dbmod.initialise(path)
    bad = "ALTER TABLE vms ADD COLUMN note TEXT;\nCREATE TABLE vms (x);\n"
    monkeypatch.setattr(dbmod, "MIGRATIONS", (*dbmod.MIGRATIONS, bad))
    monkeypatch.setattr(dbmod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(
        DatabaseUnavailable, match=f"migration to schema {SCHEMA_VERSION + 1} failed"
    ):
        dbmod.initialise(path)
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "note" not in [row[1] for row in c.execute("PRAGMA table_info(vms)")]
