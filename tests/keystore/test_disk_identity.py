"""Issue 12 finding 15: `disk destroy` erases only the image that was recorded, and an alias
of a recorded path cannot record the same image twice."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner

from keystore.auth import AuthPolicy
from keystore.cli import main
from keystore.errors import AlreadyExists
from keystore.models import DiskState
from keystore.services import disks
from keystore.services.store import Keystore
from keystore.sqlite import connection as dbmod
from keystore.sqlite import repository as sqlite_repo
from keystore.sqlite.schema import MIGRATIONS
from tests.support.erase import MIB, make_luks, opens

FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
PW = b"s3cret-horse-battery"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Keystore:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    monkeypatch.setenv("VMSHIELD_DB", str(tmp_path / "ks.db"))
    dbmod.initialise(tmp_path / "ks.db")
    ks = Keystore(tmp_path / "ks.db")
    ks.run(lambda r: r.add_principal("alice", PW, actor="t"))
    ks.run(lambda r: r.add_vm("web1", "alice", actor="t"))
    return ks


def _create(store: Keystore) -> Path:
    vm = store.run(lambda r: r.get_vm("web1"))
    path = store.path.parent / "web1-0.img"
    disks.create_disk(
        store, vm, "web1-0", path, 2 * MIB, PW,
        fmt="luks1", cipher="aes-xts-plain64", iterations=1000, iter_time_ms=1, who="t",
    )  # fmt: skip
    return path


def _destroy(code: int) -> str:
    r = CliRunner().invoke(main, ["disk", "destroy", "web1-0", "-m", "zero", "--yes"])
    assert r.exit_code == code, r.output
    return r.output


def test_create_records_the_images_identity(store: Keystore) -> None:
    path = _create(store)
    d = store.run(lambda r: r.get_disk("web1-0"))
    st = path.stat()
    assert (d.st_dev, d.st_ino) == (st.st_dev, st.st_ino) and d.luks_uuid
    assert d.state is DiskState.READY


def test_destroy_refuses_another_file_at_the_recorded_path(store: Keystore) -> None:
    path = _create(store)
    path.rename(path.with_suffix(".moved"))
    make_luks(path, 4 * MIB)  # someone else's image now sits at the path
    out = _destroy(1)
    assert "another file than the recorded image" in out
    assert opens(path)  # untouched
    assert store.run(lambda r: r.get_disk("web1-0")).state is DiskState.READY


def test_destroy_refuses_another_luks_volume_in_the_same_file(store: Keystore) -> None:
    path = _create(store)
    other = path.with_suffix(".other")
    make_luks(other, 2 * MIB)
    with open(path, "r+b") as f:  # same inode, another volume's header
        f.write(other.read_bytes()[: 1 * MIB])
    out = _destroy(1)
    assert "holds LUKS volume" in out and opens(path)


def test_destroy_of_the_recorded_image_still_works(store: Keystore) -> None:
    path = _create(store)
    _destroy(0)
    assert not path.exists()
    assert store.run(lambda r: r.get_disk("web1-0")).state is DiskState.DESTROYED


def test_an_alias_cannot_record_the_same_image_twice(store: Keystore, tmp_path: Path) -> None:
    path = _create(store)
    alias_dir = tmp_path / "alias"
    alias_dir.symlink_to(path.parent)
    for alias in (
        alias_dir / path.name,
        Path(f"{path.parent}/./../{path.parent.name}/{path.name}"),
    ):
        with pytest.raises(AlreadyExists):
            store.run(
                lambda r, a=alias: r.add_disk(
                    "web1", "web1-1", str(a), fmt="luks1", cipher="aes-xts-plain64",
                    size=MIB, actor="t",
                )
            )  # fmt: skip
    assert store.run(lambda r: r.get_disk(str(alias_dir / path.name))).name == "web1-0"


def test_a_schema_1_keystore_upgrades_and_keeps_its_disks(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO principals (name, verifier, created) VALUES ('a', 'x', 't')")
    conn.execute("INSERT INTO vms (uuid, name, owner, created) VALUES ('u', 'v', 'a', 't')")
    conn.execute(
        "INSERT INTO disks (name, vm_uuid, path, format, cipher, size, state, created) "
        "VALUES ('v-0', 'u', '/x.img', 'luks1', 'aes-xts-plain64', 512, 'ready', "
        "'2026-01-01T00:00:00+00:00')"
    )
    conn.commit()
    conn.close()
    assert dbmod.initialise(db) == (False, 1)
    d = Keystore(db).run(lambda r: r.get_disk("v-0"))
    assert d.luks_uuid is None and d.st_ino is None and d.path == "/x.img"
    assert os.path.exists(db)
