"""Reusable contract tests for keystore repositories (keyring's testing/backend.py pattern).

A backend test module subclasses `RepositoryContract` and provides a `make_repo` fixture: a
callable `make_repo(clock=None) -> Repository` returning an *open* async repository on an
empty keystore (tests/keystore/test_keystore_sqlite.py does it for SQLite; a PostgreSQL backend
would do the same against a fresh schema). The tests drive the async API through `Sync`, a
proxy that runs every coroutine on one event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keystore.audit import os_identity
from keystore.errors import (
    AccountLocked,
    AlreadyExists,
    AuthenticationFailed,
    Conflict,
    NotFound,
)
from keystore.models import DiskState, UsbAction
from usbgate.rules.policy import Action, Device, decide

PW = b"correct horse battery"
ACTOR = "test"


class Sync:
    """Runs the async repository's methods to completion on one private event loop."""

    def __init__(self, runner: asyncio.Runner, repo: Any) -> None:
        self._runner = runner
        self._repo = repo

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._repo, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._runner.run(attr(*args, **kwargs))

        return call


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class RepositoryContract:
    """Behaviour every Repository backend must show. Subclasses provide `make_repo`."""

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def repo(self, make_repo: Callable[..., Any], clock: FakeClock) -> Iterator[Sync]:
        with asyncio.Runner() as runner:
            r = runner.run(make_repo(clock=clock))
            try:
                yield Sync(runner, r)
            finally:
                runner.run(r.close())

    @pytest.fixture
    def vm(self, repo: Sync) -> str:
        repo.add_principal("alice", PW, actor=ACTOR)
        repo.add_vm("web1", "alice", actor=ACTOR)
        return "web1"

    # -- principals and authentication --------------------------------------------------

    def test_principal_roundtrip(self, repo: Sync) -> None:
        p = repo.add_principal("alice", PW, actor=ACTOR)
        assert p.name == "alice" and p.failed_attempts == 0 and p.last_login is None
        assert [x.name for x in repo.list_principals()] == ["alice"]
        with pytest.raises(AlreadyExists):
            repo.add_principal("alice", PW, actor=ACTOR)

    def test_invalid_names_refused(self, repo: Sync) -> None:
        for bad in ("", "a b", "../x", "-x", "x" * 65):
            with pytest.raises(ValueError):
                repo.add_principal(bad, PW, actor=ACTOR)

    def test_authenticate_ok_sets_last_login(self, repo: Sync, clock: FakeClock) -> None:
        repo.add_principal("alice", PW, actor=ACTOR)
        p = repo.authenticate("alice", PW, actor=ACTOR)
        assert p.last_login == clock.now
        assert [e.action for e in repo.list_audit()][-1] == "auth.ok"

    def test_wrong_password_counted_and_audited(self, repo: Sync) -> None:
        repo.add_principal("alice", PW, actor=ACTOR)
        with pytest.raises(AuthenticationFailed):
            repo.authenticate("alice", b"wrong password", actor=ACTOR)
        assert repo.get_principal("alice").failed_attempts == 1
        last = repo.list_audit()[-1]
        assert last.action == "auth.fail" and last.detail["user"] == "alice"
        repo.authenticate("alice", PW, actor=ACTOR)
        assert repo.get_principal("alice").failed_attempts == 0

    def test_unknown_user_same_error(self, repo: Sync) -> None:
        with pytest.raises(AuthenticationFailed) as exc:
            repo.authenticate("nobody", PW, actor=ACTOR)
        assert type(exc.value) is AuthenticationFailed
        last = repo.list_audit()[-1]
        assert last.detail == {"user": "nobody", "reason": "unknown user"}
        assert {"os_uid": last.os_uid, "os_user": last.os_user} == os_identity()

    def test_lockout_refuses_without_checking(self, repo: Sync, clock: FakeClock) -> None:
        repo.add_principal("alice", PW, actor=ACTOR)
        for _ in range(5):
            with pytest.raises(AuthenticationFailed):
                repo.authenticate("alice", b"wrong password", actor=ACTOR)
        assert repo.get_principal("alice").locked_until == clock.now + timedelta(minutes=15)
        # even the right password is refused while locked
        with pytest.raises(AccountLocked):
            repo.authenticate("alice", PW, actor=ACTOR)
        assert repo.list_audit()[-1].action == "auth.refused"
        clock.now += timedelta(minutes=16)
        assert repo.authenticate("alice", PW, actor=ACTOR).failed_attempts == 0

    def test_unlock_and_passwd(self, repo: Sync) -> None:
        repo.add_principal("alice", PW, actor=ACTOR)
        for _ in range(5):
            with pytest.raises(AuthenticationFailed):
                repo.authenticate("alice", b"wrong password", actor=ACTOR)
        repo.unlock_principal("alice", actor=ACTOR)
        repo.set_password("alice", b"another password", actor=ACTOR)
        with pytest.raises(AuthenticationFailed):
            repo.authenticate("alice", PW, actor=ACTOR)
        repo.authenticate("alice", b"another password", actor=ACTOR)

    def test_remove_principal_refused_while_owning(self, repo: Sync, vm: str) -> None:
        with pytest.raises(Conflict, match="web1"):
            repo.remove_principal("alice", actor=ACTOR)
        assert repo.get_principal("alice").name == "alice"
        repo.remove_vm(vm, actor=ACTOR)
        repo.remove_principal("alice", actor=ACTOR)
        assert repo.list_audit()[-1].action == "user.remove"
        with pytest.raises(NotFound):
            repo.get_principal("alice")
        with pytest.raises(AuthenticationFailed):
            repo.authenticate("alice", PW, actor=ACTOR)
        with pytest.raises(NotFound):
            repo.remove_principal("alice", actor=ACTOR)
        assert repo.verify_audit().ok

    # -- VMs ----------------------------------------------------------------------------

    def test_vm_roundtrip(self, repo: Sync, vm: str) -> None:
        v = repo.get_vm(vm)
        assert v.owner == "alice" and v.access_count == 0 and v.last_access is None
        assert repo.get_vm(v.uuid) == v
        assert [x.name for x in repo.list_vms()] == ["web1"]
        assert repo.list_vms(owner="bob") == []
        with pytest.raises(AlreadyExists):
            repo.add_vm("web1", "alice", actor=ACTOR)
        with pytest.raises(NotFound):
            repo.add_vm("web2", "bob", actor=ACTOR)

    def test_vm_explicit_uuids(self, repo: Sync) -> None:
        repo.add_principal("alice", PW, actor=ACTOR)
        u = "12345678-1234-5678-1234-567812345678"
        v = repo.add_vm("db", "alice", actor=ACTOR, uuid=u.upper(), pool_uuid=u, domain_uuid=u)
        assert (v.uuid, v.pool_uuid, v.domain_uuid) == (u, u, u)
        with pytest.raises(ValueError):
            repo.add_vm("db2", "alice", actor=ACTOR, uuid="not-a-uuid")

    def test_record_access(self, repo: Sync, vm: str, clock: FakeClock) -> None:
        repo.record_access(vm)
        v = repo.record_access(vm)
        assert v.access_count == 2 and v.last_access == clock.now

    def test_remove_vm_refuses_with_live_disks(self, repo: Sync, vm: str) -> None:
        repo.add_disk(
            vm,
            "web1-0",
            "/tmp/x.img",
            fmt="luks1",
            cipher="aes-xts-plain64",
            size=1 << 20,
            actor=ACTOR,
        )
        with pytest.raises(Conflict, match="web1-0"):
            repo.remove_vm(vm, actor=ACTOR)
        repo.set_disk_state("web1-0", DiskState.DESTROYED, actor=ACTOR)
        repo.remove_vm(vm, actor=ACTOR)
        with pytest.raises(NotFound):
            repo.get_vm(vm)

    # -- disks and servers --------------------------------------------------------------

    def test_disk_roundtrip_and_state_cas(self, repo: Sync, vm: str) -> None:
        d = repo.add_disk(
            vm,
            "web1-0",
            "/tmp/web1-0.img",
            fmt="luks1",
            cipher="aes-xts-plain64",
            size=1 << 30,
            actor=ACTOR,
        )
        assert d.state is DiskState.CREATING and d.vm == vm
        assert repo.get_disk("/tmp/web1-0.img") == d
        with pytest.raises(AlreadyExists):
            repo.add_disk(
                vm, "other", "/tmp/web1-0.img", fmt="luks1", cipher="x", size=1, actor=ACTOR
            )
        repo.set_disk_state("web1-0", DiskState.READY, actor=ACTOR)
        d2 = repo.set_disk_state(
            "web1-0", DiskState.DESTROYING, expect=DiskState.READY, actor=ACTOR
        )
        assert d2.state is DiskState.DESTROYING
        with pytest.raises(Conflict):
            repo.set_disk_state("web1-0", DiskState.DESTROYING, expect=DiskState.READY, actor=ACTOR)
        assert [x.name for x in repo.list_disks(vm)] == ["web1-0"]

    def test_servers(self, repo: Sync, vm: str) -> None:
        repo.add_disk(vm, "web1-0", "/tmp/a.img", fmt="luks1", cipher="c", size=512, actor=ACTOR)
        s = repo.record_server(
            "web1-0", socket="/tmp/s.sock", pidfile="/tmp/s.pid", pid=42, readonly=True, actor=ACTOR
        )
        assert s.readonly and s.pid == 42 and repo.get_server("web1-0") == s
        assert repo.list_servers() == [s]
        with pytest.raises(Conflict):
            repo.forget_disk("web1-0", actor=ACTOR)
        assert repo.remove_server("web1-0", actor=ACTOR) == s
        assert repo.get_server("web1-0") is None
        repo.forget_disk("web1-0", actor=ACTOR)
        assert repo.list_disks() == []

    # -- permissions --------------------------------------------------------------------

    def test_erase_permission_default_and_set(self, repo: Sync, vm: str) -> None:
        p = repo.get_erase_permission(vm)
        assert (p.deep_erase, p.normal_delete) == (True, False)
        p = repo.set_erase_permission(vm, normal_delete=True, actor=ACTOR)
        assert (p.deep_erase, p.normal_delete) == (True, True)
        p = repo.set_erase_permission(vm, deep_erase=False, actor=ACTOR)
        assert repo.get_erase_permission(vm) == p and not p.deep_erase and p.normal_delete
        with pytest.raises(NotFound):
            repo.get_erase_permission("nope")

    def test_unlock_policy_default_and_set(self, repo: Sync, vm: str) -> None:
        assert repo.get_vm(vm).unlock == "any"
        assert repo.set_unlock_policy(vm, "network", actor=ACTOR).unlock == "network"
        assert repo.get_vm(vm).unlock == "network" and repo.list_vms()[0].unlock == "network"
        with pytest.raises(ValueError, match="unlock policy"):
            repo.set_unlock_policy(vm, "nobody", actor=ACTOR)
        with pytest.raises(NotFound):
            repo.set_unlock_policy("nope", "owner", actor=ACTOR)
        assert repo.list_audit(vm=vm)[-1].detail == {"unlock": "network"}

    # -- USB rules ----------------------------------------------------------------------

    def test_usb_rules_order_and_first_match(self, repo: Sync, vm: str) -> None:
        repo.add_usb_rule(
            vm, UsbAction.ALLOW, 0x0781, 0x5567, actor=ACTOR, interfaces=[(8, 6, 0x50)]
        )
        repo.add_usb_rule(vm, UsbAction.REJECT, None, None, actor=ACTOR, device_class=9)
        r = repo.add_usb_rule(vm, UsbAction.BLOCK, 0x0781, None, actor=ACTOR, position=1)
        rules = repo.list_usb_rules(vm)
        assert [x.position for x in rules] == [1, 2, 3]
        assert rules[0] == r and rules[1].interfaces == ((8, 6, 0x50),)
        stick = Device(0x0781, 0x5567, 0, ((8, 6, 0x50),))

        def verdict(device: Device) -> Action:
            return decide(rules, device).action

        assert verdict(stick) is Action.BLOCK  # rule 1 shadows rule 2
        repo.remove_usb_rule(vm, 1, actor=ACTOR)
        rules = repo.list_usb_rules(vm)
        assert [x.position for x in rules] == [1, 2]
        assert verdict(stick) is Action.ALLOW
        assert verdict(Device(1, 2, 9)) is Action.REJECT
        with pytest.raises(NotFound):
            repo.remove_usb_rule(vm, 7, actor=ACTOR)
        with pytest.raises(ValueError):
            repo.add_usb_rule(vm, UsbAction.ALLOW, 1, 1, actor=ACTOR, position=9)

    def test_usb_rules_removed_with_vm(self, repo: Sync, vm: str) -> None:
        repo.add_usb_rule(vm, UsbAction.ALLOW, 1, 2, actor=ACTOR, serial="S1")
        repo.remove_vm(vm, actor=ACTOR)
        with pytest.raises(NotFound):
            repo.list_usb_rules(vm)

    # -- audit --------------------------------------------------------------------------

    def test_every_change_is_audited_and_chain_verifies(self, repo: Sync, vm: str) -> None:
        repo.set_erase_permission(vm, normal_delete=True, actor="admin")
        actions = [e.action for e in repo.list_audit()]
        assert actions == ["user.add", "vm.add", "perm.set"]
        entries = repo.list_audit(vm=vm)
        assert [e.action for e in entries] == ["vm.add", "perm.set"]
        assert entries[-1].actor == "admin"
        assert [e.action for e in repo.list_audit(limit=1)] == ["perm.set"]
        result = repo.verify_audit()
        assert result.ok and result.rows == 3 and result.head_seq == 3
        assert repo.verify_audit(anchor=f"2:{repo.list_audit()[1].hash}").ok
        assert not repo.verify_audit(anchor="2:" + "0" * 64).ok

    def test_audit_chain_links(self, repo: Sync) -> None:
        a = repo.append_audit("usbgate", "usb.attach", "web1", {"vid": "0781"})
        b = repo.append_audit("erase", "disk.erase.done", None, {})
        assert b.prev_hash == a.hash and b.seq == a.seq + 1
        with pytest.raises(ValueError):
            repo.append_audit("x", "y", None, {"passphrase": "nope"})
