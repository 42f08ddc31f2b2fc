"""The keystore workflows called without click: destroy, disk create, the command tree."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import click
import pytest
from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.cli import TREE, load, main
from keystore.errors import AuthenticationFailed, Conflict, InUse, PermissionDenied
from keystore.models import DiskState
from keystore.services import destroy, disks
from keystore.services.store import Keystore
from keystore.sqlite import connection as dbmod
from keystore.sqlite import repository as sqlite_repo
from nbd_plugin.erase import EraseOptions
from tests.support.erase import MIB, make_luks

FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
PW = b"s3cret-horse-battery"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Keystore:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    db = tmp_path / "ks.db"
    dbmod.initialise(db)
    ks = Keystore(db)
    ks.run(lambda r: r.add_principal("alice", PW, actor="test"))
    ks.run(lambda r: r.add_vm("web1", "alice", actor="test"))
    return ks


def _disk(store: Keystore, name: str = "web1-0") -> Path:
    img = store.path.parent / f"{name}.img"
    make_luks(img, 8 * MIB)
    store.run(
        lambda r: r.add_disk(
            "web1",
            name,
            str(img),
            fmt="luks1",
            cipher="aes-xts-plain64",
            size=6 * MIB,
            actor="test",
            state=DiskState.READY,
        )
    )
    return img


def _state(store: Keystore, name: str = "web1-0") -> DiskState:
    return store.run(lambda r: r.get_disk(name)).state


def test_destroy_policy_refusal_is_audited_and_changes_nothing(store: Keystore) -> None:
    img = _disk(store)
    with pytest.raises(PermissionDenied, match="normal delete") as info:
        store.run(lambda r: destroy.claim(r, "web1-0", "crypto", "tester"))
    assert info.value.exit_code == 77
    last = store.run(lambda r: r.list_audit(None, 1))[0]
    assert last.action == "disk.destroy.denied" and last.actor == "tester"
    assert _state(store) is DiskState.READY and img.exists()


def test_destroy_without_click_records_the_certificate(store: Keystore) -> None:
    img = _disk(store)
    disk = store.run(lambda r: destroy.claim(r, "web1-0", "zero", "tester"))
    cert = destroy.execute(
        store, disk, "zero", EraseOptions(), erase=destroy.eraser(), who="tester"
    )
    assert cert.verified and not img.exists()
    assert _state(store) is DiskState.DESTROYED
    last = store.run(lambda r: r.list_audit(None, 1))[0]
    assert last.detail["certificate_sha256"] == cert.sha256
    with pytest.raises(Conflict, match="destroyed"):
        store.run(lambda r: destroy.claim(r, "web1-0", "zero", "tester"))


def test_destroy_of_a_busy_image_keeps_the_state(store: Keystore) -> None:
    img = _disk(store)
    disk = store.run(lambda r: r.get_disk("web1-0"))
    with open(img, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_SH)
        with pytest.raises(InUse) as info:
            destroy.execute(
                store, disk, "zero", EraseOptions(), erase=destroy.eraser(), who="tester"
            )
    assert info.value.exit_code == 75
    assert _state(store) is DiskState.READY and img.exists()


def test_a_failing_erase_leaves_the_disk_failed_with_a_resume_hint(store: Keystore) -> None:
    _disk(store)
    disk = store.run(lambda r: r.get_disk("web1-0"))

    def broken(path: str, method: str, options: EraseOptions) -> destroy.Certificate:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        destroy.execute(store, disk, "zero", EraseOptions(), erase=broken, who="tester")
    assert _state(store) is DiskState.FAILED
    last = store.run(lambda r: r.list_audit(None, 1))[0]
    assert last.detail["resume"] == "vmshield disk destroy web1-0 -m zero"


def test_the_background_worker_is_a_module_entry_point() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "keystore.services.destroy"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "usage: python -m keystore.services.destroy" in r.stderr


def test_disk_create_compensation_removes_what_it_made(store: Keystore) -> None:
    vm = store.run(lambda r: r.get_vm("web1"))
    path = store.path.parent / "d.img"
    with pytest.raises(disks.DiskOpError, match="nothing was left behind"):
        disks.create_disk(
            store, vm, "web1-0", path, MIB, PW,
            fmt="luks1", cipher="no-such-cipher", iterations=1000, iter_time_ms=1, who="t",
        )  # fmt: skip
    assert store.run(lambda r: r.list_disks()) == [] and not path.exists()
    undone = store.run(lambda r: r.list_audit(None, 2))[0]
    assert undone.action == "disk.create.undone" and "no-such-cipher" in undone.detail["error"]
    with pytest.raises(AuthenticationFailed):
        disks.create_disk(
            store, vm, "web1-1", path, MIB, b"wrong-password",
            fmt="luks1", cipher="aes-xts-plain64", iterations=1000, iter_time_ms=1, who="t",
        )  # fmt: skip
    assert store.run(lambda r: r.list_disks()) == []


def test_the_tree_lists_every_group_and_command() -> None:
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(name for name, _, _ in TREE)
    for name, ref, subcommands in TREE:
        group = main.get_command(ctx, name)
        assert group is not None and group.name == name, ref
        if subcommands:
            assert isinstance(group, click.Group)
            assert {load(s).name for s in subcommands} <= set(group.commands)
    assert main.get_command(ctx, "no-such-command") is None
