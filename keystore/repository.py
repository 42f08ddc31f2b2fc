"""The repository interface every keystore backend implements (SQLite, PostgreSQL).

All methods are coroutines. Mutating methods take `actor` (who asked: an OS user, a
principal, or a component such as "usbgate") and write their audit row in the same
transaction as the change, so a change is never recorded without its audit row or the
reverse. The contract tests in tests/support/keystore_contract.py run against every backend;
keystore.backends opens the backend a `Location` names; keystore.storage.repository is the
one implementation, over each backend's connection adapter.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, Protocol, Self

from keystore.audit import VerifyResult
from keystore.models import (
    AuditEntry,
    Disk,
    DiskState,
    ErasePermission,
    Principal,
    Server,
    UsbAction,
    UsbRule,
    Vm,
)
from usbgate.rules.policy import Pattern

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def canonical_path(path: str) -> str:
    """The one name of an image path: absolute, symlinks and `..` resolved (os.path.realpath),
    so an alias cannot record the same image twice under UNIQUE(path)."""
    return os.path.realpath(path)


def check_name(kind: str, name: str) -> str:
    """Names end up in file and socket names: letters, digits, `_ . -`, at most 64."""
    if not _NAME.match(name or ""):
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


class Repository(Protocol):
    """What the CLI, usbgate and erase need from a keystore backend."""

    async def close(self) -> None: ...
    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc: object) -> None: ...

    # principals
    async def add_principal(self, name: str, password: bytes, *, actor: str) -> Principal: ...
    async def set_password(self, name: str, password: bytes, *, actor: str) -> Principal: ...
    async def get_principal(self, name: str) -> Principal: ...
    async def list_principals(self) -> list[Principal]: ...
    async def authenticate(
        self, name: str, password: bytes, *, actor: str, vm: str | None = None
    ) -> Principal: ...
    async def unlock_principal(self, name: str, *, actor: str) -> Principal: ...
    async def remove_principal(self, name: str, *, actor: str) -> Principal: ...

    # VMs
    async def add_vm(
        self,
        name: str,
        owner: str,
        *,
        actor: str,
        uuid: str | None = None,
        pool_uuid: str | None = None,
        domain_uuid: str | None = None,
    ) -> Vm: ...
    async def get_vm(self, name: str) -> Vm: ...
    async def list_vms(self, owner: str | None = None) -> list[Vm]: ...
    async def remove_vm(self, name: str, *, actor: str) -> Vm: ...
    async def record_access(self, vm: str) -> Vm: ...

    # disks
    async def add_disk(
        self,
        vm: str,
        name: str,
        path: str,
        *,
        fmt: str,
        cipher: str,
        size: int,
        actor: str,
        state: DiskState = DiskState.CREATING,
    ) -> Disk: ...
    async def set_disk_identity(
        self, name: str, *, luks_uuid: str, st_dev: int, st_ino: int, actor: str
    ) -> Disk: ...
    async def get_disk(self, name: str) -> Disk: ...
    async def list_disks(self, vm: str | None = None) -> list[Disk]: ...
    async def set_disk_state(
        self,
        name: str,
        state: DiskState,
        *,
        actor: str,
        expect: DiskState | Sequence[DiskState] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Disk: ...
    async def forget_disk(self, name: str, *, actor: str) -> Disk: ...

    # running servers
    async def record_server(
        self, disk: str, *, socket: str, pidfile: str, pid: int, readonly: bool, actor: str
    ) -> Server: ...
    async def get_server(self, disk: str) -> Server | None: ...
    async def list_servers(self) -> list[Server]: ...
    async def remove_server(self, disk: str, *, actor: str) -> Server | None: ...

    # erase permissions (thesis table 5-2)
    async def get_erase_permission(self, vm: str) -> ErasePermission: ...
    async def set_erase_permission(
        self,
        vm: str,
        *,
        actor: str,
        deep_erase: bool | None = None,
        normal_delete: bool | None = None,
    ) -> ErasePermission: ...

    async def set_unlock_policy(self, vm: str, policy: str, *, actor: str) -> Vm:
        """Which unattended ways may open VM's disks (models.UNLOCK_POLICIES); audited."""
        ...

    # USB rules (thesis table 5-3)
    async def add_usb_rule(
        self,
        vm: str,
        action: UsbAction,
        vendor_id: int | None,
        product_id: int | None,
        *,
        actor: str,
        device_class: int | None = None,
        interfaces: Sequence[Pattern] | None = None,
        serial: str | None = None,
        position: int | None = None,
        expect: Sequence[int] | None = None,
    ) -> UsbRule: ...
    async def list_usb_rules(self, vm: str) -> list[UsbRule]: ...
    async def remove_usb_rule(self, vm: str, position: int, *, actor: str) -> UsbRule: ...

    # audit
    async def append_audit(
        self, actor: str, action: str, vm: str | None = None, detail: dict[str, Any] | None = None
    ) -> AuditEntry: ...
    async def list_audit(
        self, vm: str | None = None, limit: int | None = None
    ) -> list[AuditEntry]: ...
    async def verify_audit(self, anchor: str | None = None) -> VerifyResult: ...
