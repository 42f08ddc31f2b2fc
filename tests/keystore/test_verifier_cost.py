"""Issue 20 B5: the owner's verifier is never a cheaper oracle than the keyslots it guards.

The password is also the LUKS passphrase; a stolen keystore is attacked through whichever of
verifier and keyslot costs less per guess. The verifier must cost at least each keyslot."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import argon2
import pytest
from click.testing import CliRunner

from keystore.auth import default_hasher
from keystore.cli import main
from keystore.services.store import Keystore
from tests.support.nbd import write_secret

PW = b"s3cret-horse-battery"
NEW = b"another-long-secret"
#: a PBKDF2 keyslot dearer than the default verifier (64 MiB x 3 = 196,608 KiB-passes)
ITERATIONS = 250_000


def vms(db: Path, *args: str) -> None:
    r = CliRunner().invoke(main, list(args), env={"VMSHIELD_DB": str(db)})
    assert r.exit_code == 0, r.output


def stored(db: Path) -> argon2.Parameters:
    with sqlite3.connect(db) as c:
        (v,) = c.execute("SELECT verifier FROM principals WHERE name = 'alice'").fetchone()
    return argon2.extract_parameters(v)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    db = tmp_path / "ks.db"
    pw = tmp_path / "pw"
    write_secret(pw, PW)
    vms(db, "init")
    vms(db, "user", "add", "alice", "--password-file", str(pw))
    vms(db, "vm", "add", "web", "--owner", "alice")
    vms(db, "disk", "create", "web", "--size", "4M", "--pbkdf-iterations", str(ITERATIONS),
        "--password-file", str(pw))  # fmt: skip
    return db


def test_the_verifier_follows_the_keyslots(db: Path, tmp_path: Path) -> None:
    got = stored(db)  # after `disk create`
    assert got.type is argon2.Type.ID
    assert got.memory_cost * got.time_cost >= ITERATIONS, got
    # a login through the default policy does not lower it again
    Keystore(db).run(lambda r: r.authenticate("alice", PW, actor="t"))
    assert stored(db) == got
    # nor does a password change (the keyslots are re-keyed at the same cost)
    old, new = tmp_path / "old", tmp_path / "new"
    write_secret(old, PW)
    write_secret(new, NEW)
    vms(db, "user", "passwd", "alice", "--password-file", str(old), "--new-password-file",
        str(new), "--pbkdf-iterations", str(ITERATIONS))  # fmt: skip
    got = stored(db)
    assert got.memory_cost * got.time_cost >= ITERATIONS, got
    Keystore(db).run(lambda r: r.authenticate("alice", NEW, actor="t"))


def test_an_argon2_keyslot_sets_memory_and_passes(tmp_path: Path) -> None:
    img, key = tmp_path / "a.img", tmp_path / "key"
    write_secret(key, PW)
    with img.open("wb") as f:
        f.truncate(32 << 20)
    subprocess.run(
        ["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "argon2id",
         "--pbkdf-memory", "131072", "--pbkdf-force-iterations", "4", "--pbkdf-parallel", "2",
         "--key-file", str(key), str(img)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    from keystore.services import verifier

    floor = verifier.floor_of([str(img)])
    assert (floor.memory_kib, floor.time) == (131072, 4)
    default = default_hasher().hash(PW)
    assert not verifier.covers(default, floor)  # 64 MiB would be the cheaper oracle
    raised = verifier.hasher_for(floor).hash(PW)
    assert verifier.covers(raised, floor)
    got = argon2.extract_parameters(raised)
    assert got.memory_cost >= 131072 and got.time_cost >= 4
