"""Issue 20 C: the shadow check of `vmshield usb allow|block|reject` against a second admin.

The command reads the VM's rules, decides where the new rule must go to take effect (first
match wins), then inserts it. A second admin inserting a broader rule in between made the new
rule land behind it: shadowed, it never decides. The race is made deterministic here: the
second admin's insert (a real write through its own connection) runs right after the first
read of the rules. The command runs on the blocking connection (no event loop: issue 26), so
the second admin writes through one too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner, Result

from keystore.auth import AuthPolicy
from keystore.backends import open_blocking
from keystore.cli import main
from keystore.models import UsbAction
from keystore.services import store as store_mod
from keystore.sqlite import repository as sqlite_repo
from usbgate.rules import policy

FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


def vms(*args: str, code: int = 0) -> Result:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


class SecondAdmin:
    """Wraps the command's repository: after its first read of the rules, another admin
    inserts `allow id 0781:*` at position 1 through a connection of their own."""

    def __init__(self, repo: Any, db: Path) -> None:
        self._repo, self._db, self.raced = repo, db, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)

    async def list_usb_rules(self, vm: str) -> Any:
        rules = await self._repo.list_usb_rules(vm)
        if not self.raced:
            self.raced = True
            other = open_blocking(self._db)
            assert other is not None
            try:
                await other.add_usb_rule(vm, UsbAction.ALLOW, 0x0781, None, actor="bob",
                                         position=1)  # fmt: skip
            finally:
                await other.close()
        return rules


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ks.db"
    monkeypatch.setenv("VMSHIELD_DB", str(path))
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    vms("init")
    vms("user", "add", "alice", input_file(tmp_path))
    vms("vm", "add", "web", "--owner", "alice")
    vms("usb", "allow", "web", "1111:2222")  # so the new rule's place is 2, the end
    return path


def input_file(tmp_path: Path) -> str:
    f = tmp_path / "pw"
    f.write_bytes(b"s3cret-horse-battery")
    f.chmod(0o600)
    return f"--password-file={f}"


def test_a_rule_added_meanwhile_cannot_shadow_the_new_one(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    racers: list[SecondAdmin] = []
    real_open = store_mod.open_blocking

    def racing_open(location: Any, **kw: Any) -> Any:
        repo = SecondAdmin(real_open(location, **kw), db)
        repo.raced = bool(racers)  # only the first repository the command opens races
        racers.append(repo)
        return repo

    monkeypatch.setattr(store_mod, "open_blocking", racing_open)
    vms("usb", "block", "web", "0781:5567")
    monkeypatch.setattr(store_mod, "open_blocking", real_open)
    assert racers and racers[0].raced
    from keystore.services.store import Keystore

    got = Keystore(db).run(lambda r: r.list_usb_rules("web"))
    assert len(got) == 3, [str(r) for r in got]
    # the block rule decides its device: it is not behind the broader allow
    assert policy.shadowed(got) == [None, None, None], [str(r) for r in got]
    stick = policy.Device(0x0781, 0x5567, 0)
    assert policy.decide(got, stick).action is policy.Action.BLOCK
