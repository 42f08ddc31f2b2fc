"""The one implementation of `keystore.repository.Repository`, over either backend.

Every rule lives here once: names, positions, compare-and-set, the lockout, and the audit row
written in the same transaction as the change. The SQL is written once (dialect templates);
the connection adapter (keystore.storage.connection) runs it on SQLite or PostgreSQL and
serializes writers in that backend's way.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Self, TypeVar

from keystore import audit as auditmod
from keystore.auth import AuthPolicy, failed_error, locked_error
from keystore.errors import AlreadyExists, Conflict, NotFound
from keystore.location import Location
from keystore.models import (
    DEFAULT_ERASE_PERMISSION,
    UNLOCK_POLICIES,
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
from keystore.repository import canonical_path, check_name
from keystore.storage import rows
from keystore.storage.connection import Connection
from usbgate.rules.policy import Pattern

Clock = Callable[[], datetime]
T = TypeVar("T")


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` (a KDF: seconds of CPU) in a thread, so the event loop goes on meanwhile.
    Only the operations that hash or verify a password import asyncio: the others also run
    without an event loop, on a connection whose awaits never suspend."""
    import asyncio

    return await asyncio.to_thread(fn, *args)


class StoreRepository:
    """A keystore on one open connection; each backend's `open` makes one
    (keystore.backends.open_repository picks the backend)."""

    def __init__(
        self, conn: Connection, *, policy: AuthPolicy, clock: Clock = auditmod.now
    ) -> None:
        self.conn = conn
        self.policy = policy
        self.clock = clock

    @property
    def location(self) -> Location:
        return self.conn.location

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _now(self) -> str:
        return self.clock().isoformat()

    async def _audit(
        self, actor: str, action: str, vm: str | None, detail: dict[str, Any] | None
    ) -> AuditEntry:
        """Append an audit row inside the caller's write transaction."""
        row = auditmod.next_row(await self.conn.audit_tip(), actor, action, vm, detail)
        await self.conn.run(rows.AUDIT_INSERT, rows.audit_params(row))
        await self.conn.set_audit_tip(row[0], row[7])
        return auditmod.entry_from_row(row)

    async def _vm_uuid(self, name: str) -> str:
        row = await self.conn.one("SELECT uuid FROM vms WHERE name = {name}", {"name": name})
        if row is None:
            raise NotFound(f"no VM named {name!r} (see `vmshield vm list`)")
        return str(row[0])

    async def _exists(self, template: str, **params: Any) -> bool:
        return await self.conn.one(template, params) is not None

    # -- principals -------------------------------------------------------------------------

    async def add_principal(self, name: str, password: bytes, *, actor: str) -> Principal:
        check_name("user", name)
        verifier = await _off_loop(self.policy.hash, password)
        async with self.conn.write():
            if await self._exists("SELECT 1 FROM principals WHERE name = {name}", name=name):
                raise AlreadyExists(f"user {name!r} already exists")
            await self.conn.run(
                "INSERT INTO principals (name, verifier, created) "
                "VALUES ({name}, {verifier}, {created})",
                {"name": name, "verifier": verifier, "created": self._now()},
            )
            await self._audit(actor, "user.add", None, {"user": name})
        return await self.get_principal(name)

    async def set_password(self, name: str, password: bytes, *, actor: str) -> Principal:
        verifier = await _off_loop(self.policy.hash, password)
        async with self.conn.write():
            changed = await self.conn.run(
                "UPDATE principals SET verifier = {verifier}, failed_attempts = 0, "
                "locked_until = NULL WHERE name = {name}",
                {"verifier": verifier, "name": name},
            )
            if changed == 0:
                raise NotFound(f"no user named {name!r}")
            await self._audit(actor, "user.passwd", None, {"user": name})
        return await self.get_principal(name)

    async def get_principal(self, name: str) -> Principal:
        row = await self.conn.one(
            f"SELECT {rows.PRINCIPAL_COLUMNS} FROM principals WHERE name = {{name}}",
            {"name": name},
        )
        if row is None:
            raise NotFound(f"no user named {name!r} (see `vmshield user list`)")
        return rows.principal(row)

    async def list_principals(self) -> list[Principal]:
        found = await self.conn.all(
            f"SELECT {rows.PRINCIPAL_COLUMNS} FROM principals ORDER BY name"
        )
        return [rows.principal(r) for r in found]

    async def authenticate(
        self, name: str, password: bytes, *, actor: str, vm: str | None = None
    ) -> Principal:
        """Check `password` for `name`; count, lock and audit. Raises the opaque
        AuthenticationFailed for an unknown user or a wrong password, AccountLocked while
        locked (without checking the password).

        The attempt is reserved before the (slow) verification, in the same write
        transaction as the lock check: it counts as a failure until it is settled, and the
        reservation that reaches the policy's limit locks the account. So at most the
        remaining attempts can be verified at once, however many processes guess in
        parallel; a success settles by clearing the counter and the lock. `vm` is the VM
        the login is for (its disks are about to be opened), recorded on the audit rows.
        """
        now = self.clock()
        until: datetime | None = None
        reserved = 0
        async with self.conn.write():
            row = await self.conn.one(
                "SELECT verifier, locked_until FROM principals WHERE name = {name}",
                {"name": name},
            )
            until = self.policy.locked_until(rows.dt(row[1]) if row else None, now)
            if until is not None:
                await self._audit(
                    actor,
                    "auth.refused",
                    vm,
                    {"user": name, "reason": "locked", "locked_until": str(row[1])},  # type: ignore[index]
                )
            elif row is not None:
                reserved = await self._reserve_attempt(name, now)
        if until is not None:
            raise locked_error(self.policy, name, until, now)
        if row is None:
            await _off_loop(self.policy.burn, password)
            ok = False
        else:
            ok = await _off_loop(self.policy.verify, row[0], password)
        async with self.conn.write():
            if ok:
                new = None
                if self.policy.needs_rehash(row[0]):  # type: ignore[index]
                    new = await _off_loop(self.policy.hash, password)
                await self.conn.run(
                    "UPDATE principals SET failed_attempts = 0, locked_until = NULL, "
                    "last_login = {now}, verifier = coalesce({new}, verifier) WHERE name = {name}",
                    {"now": now.isoformat(), "new": new, "name": name},
                )
                await self._audit(actor, "auth.ok", vm, {"user": name})
            elif row is None:
                await self._audit(actor, "auth.fail", vm, {"user": name, "reason": "unknown user"})
            else:
                detail: dict[str, Any] = {"user": name, "failed_attempts": reserved}
                lock = self.policy.lock_after(reserved, now)
                if lock is not None:
                    detail["locked_until"] = lock.isoformat()
                await self._audit(actor, "auth.fail", vm, detail)
        if not ok:
            raise failed_error(self.policy, name, reserved if row else None)
        return await self.get_principal(name)

    async def _reserve_attempt(self, name: str, now: datetime) -> int:
        """Count one attempt as failed (inside the caller's write transaction); the one that
        reaches the limit locks the account. Returns the new count."""
        row = await self.conn.one(
            "UPDATE principals SET failed_attempts = failed_attempts + 1 "
            "WHERE name = {name} RETURNING failed_attempts",
            {"name": name},
        )
        fails = int(row[0])  # type: ignore[index]
        lock = self.policy.lock_after(fails, now)
        if lock is not None:
            await self.conn.run(
                "UPDATE principals SET locked_until = {until} WHERE name = {name}",
                {"until": lock.isoformat(), "name": name},
            )
        return fails

    async def unlock_principal(self, name: str, *, actor: str) -> Principal:
        async with self.conn.write():
            changed = await self.conn.run(
                "UPDATE principals SET failed_attempts = 0, locked_until = NULL "
                "WHERE name = {name}",
                {"name": name},
            )
            if changed == 0:
                raise NotFound(f"no user named {name!r}")
            await self._audit(actor, "user.unlock", None, {"user": name})
        return await self.get_principal(name)

    async def remove_principal(self, name: str, *, actor: str) -> Principal:
        """Delete user `name` (the verifier goes with it; the audit trail keeps the history).
        Conflict while they own a VM, naming every one: their disks open with their
        password, so a VM is removed or given to another owner first."""
        user = await self.get_principal(name)
        async with self.conn.write():
            owned = [
                r[0]
                for r in await self.conn.all(
                    "SELECT name FROM vms WHERE owner = {name} ORDER BY name", {"name": name}
                )
            ]
            if owned:
                raise Conflict(
                    f"user {name!r} still owns VM(s) {', '.join(owned)}: remove them first "
                    "(`vmshield vm remove`)"
                )
            await self.conn.run("DELETE FROM principals WHERE name = {name}", {"name": name})
            await self._audit(actor, "user.remove", None, {"user": name})
        return user

    # -- VMs --------------------------------------------------------------------------------

    async def add_vm(
        self,
        name: str,
        owner: str,
        *,
        actor: str,
        uuid: str | None = None,
        pool_uuid: str | None = None,
        domain_uuid: str | None = None,
    ) -> Vm:
        check_name("VM", name)
        vm_uuid = str(uuidlib.UUID(uuid)) if uuid else str(uuidlib.uuid4())
        pool = str(uuidlib.UUID(pool_uuid)) if pool_uuid else None
        dom = str(uuidlib.UUID(domain_uuid)) if domain_uuid else None
        async with self.conn.write():
            if not await self._exists("SELECT 1 FROM principals WHERE name = {n}", n=owner):
                raise NotFound(f"no user named {owner!r}: create it with `vmshield user add`")
            if await self._exists(
                "SELECT 1 FROM vms WHERE name = {name} OR uuid = {uuid}", name=name, uuid=vm_uuid
            ):
                raise AlreadyExists(f"a VM named {name!r} or with uuid {vm_uuid} already exists")
            await self.conn.run(
                f"INSERT INTO vms ({rows.VM_COLUMNS}) VALUES "
                "({uuid}, {name}, {owner}, {pool}, {dom}, {created}, NULL, 0, 'any')",
                {
                    "uuid": vm_uuid, "name": name, "owner": owner, "pool": pool, "dom": dom,
                    "created": self._now(),
                },
            )  # fmt: skip
            deep, normal = DEFAULT_ERASE_PERMISSION
            await self.conn.run(
                "INSERT INTO erase_permissions (vm_uuid, deep_erase, normal_delete, updated) "
                "VALUES ({uuid}, {deep}, {normal}, {now})",
                {"uuid": vm_uuid, "deep": int(deep), "normal": int(normal), "now": self._now()},
            )
            await self._audit(
                actor,
                "vm.add",
                name,
                {"uuid": vm_uuid, "owner": owner, "pool_uuid": pool, "domain_uuid": dom},
            )
        return await self.get_vm(name)

    async def get_vm(self, name: str) -> Vm:
        row = await self.conn.one(
            f"SELECT {rows.VM_COLUMNS} FROM vms WHERE name = {{name}} OR uuid = {{name}}",
            {"name": name},
        )
        if row is None:
            raise NotFound(f"no VM named {name!r} (see `vmshield vm list`)")
        return rows.vm(row)

    async def list_vms(self, owner: str | None = None) -> list[Vm]:
        if owner is None:
            found = await self.conn.all(f"SELECT {rows.VM_COLUMNS} FROM vms ORDER BY name")
        else:
            found = await self.conn.all(
                f"SELECT {rows.VM_COLUMNS} FROM vms WHERE owner = {{owner}} ORDER BY name",
                {"owner": owner},
            )
        return [rows.vm(r) for r in found]

    async def remove_vm(self, name: str, *, actor: str) -> Vm:
        vm = await self.get_vm(name)
        async with self.conn.write():
            live = [
                r[0]
                for r in await self.conn.all(
                    "SELECT name FROM disks WHERE vm_uuid = {uuid} AND state != 'destroyed'",
                    {"uuid": vm.uuid},
                )
            ]
            if live:
                raise Conflict(
                    f"VM {vm.name!r} still has disks {', '.join(live)}: destroy them first "
                    "(`vmshield disk destroy`), or forget them (`vmshield disk forget`)"
                )
            await self.conn.run("DELETE FROM disks WHERE vm_uuid = {uuid}", {"uuid": vm.uuid})
            await self.conn.run("DELETE FROM vms WHERE uuid = {uuid}", {"uuid": vm.uuid})
            await self._audit(actor, "vm.remove", vm.name, {"uuid": vm.uuid})
        return vm

    async def record_access(self, vm: str) -> Vm:
        """Set last access to now and add one to the access count."""
        async with self.conn.write():
            changed = await self.conn.run(
                "UPDATE vms SET last_access = {now}, access_count = access_count + 1 "
                "WHERE name = {vm} OR uuid = {vm}",
                {"now": self._now(), "vm": vm},
            )
            if changed == 0:
                raise NotFound(f"no VM named {vm!r}")
        return await self.get_vm(vm)

    async def set_unlock_policy(self, vm: str, policy: str, *, actor: str) -> Vm:
        """Which unattended ways may open VM's disks (models.UNLOCK_POLICIES); audited."""
        if policy not in UNLOCK_POLICIES:
            raise ValueError(f"unlock policy {policy!r}: use one of {', '.join(UNLOCK_POLICIES)}")
        v = await self.get_vm(vm)
        async with self.conn.write():
            await self.conn.run(
                "UPDATE vms SET unlock_policy = {policy} WHERE uuid = {uuid}",
                {"policy": policy, "uuid": v.uuid},
            )
            await self._audit(actor, "vm.set", v.name, {"unlock": policy})
        return await self.get_vm(v.uuid)

    # -- disks ------------------------------------------------------------------------------

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
    ) -> Disk:
        check_name("disk", name)
        if size <= 0:
            raise ValueError("disk size must be positive")
        vm_uuid = await self._vm_uuid(vm)
        path = canonical_path(path)
        state = DiskState(state)
        async with self.conn.write():
            if await self._exists(
                "SELECT 1 FROM disks WHERE name = {name} OR path = {path}", name=name, path=path
            ):
                raise AlreadyExists(f"a disk named {name!r} or with path {path} already exists")
            await self.conn.run(
                "INSERT INTO disks (name, vm_uuid, path, format, cipher, size, state, created) "
                "VALUES ({name}, {vm}, {path}, {fmt}, {cipher}, {size}, {state}, {now})",
                {
                    "name": name, "vm": vm_uuid, "path": path, "fmt": fmt, "cipher": cipher,
                    "size": size, "state": state.value, "now": self._now(),
                },
            )  # fmt: skip
            await self._audit(
                actor,
                "disk.add",
                vm,
                {
                    "disk": name,
                    "path": path,
                    "format": fmt,
                    "cipher": cipher,
                    "size": size,
                    "state": state.value,
                },
            )
        return await self.get_disk(name)

    async def set_disk_identity(
        self, name: str, *, luks_uuid: str, st_dev: int, st_ino: int, actor: str
    ) -> Disk:
        """Record what the disk's image is (after creating or importing it)."""
        async with self.conn.write():
            changed = await self.conn.run(
                "UPDATE disks SET luks_uuid = {uuid}, st_dev = {dev}, st_ino = {ino} "
                "WHERE name = {name}",
                {"uuid": luks_uuid, "dev": st_dev, "ino": st_ino, "name": name},
            )
            if changed == 0:
                raise NotFound(f"no disk named {name!r} (see `vmshield disk list`)")
            row = await self.conn.one(rows.DISK_SELECT + " WHERE d.name = {name}", {"name": name})
            detail = {"disk": name, "luks_uuid": luks_uuid, "st_dev": st_dev, "st_ino": st_ino}
            await self._audit(actor, "disk.identity", rows.disk(row).vm if row else None, detail)
        return await self.get_disk(name)

    async def get_disk(self, name: str) -> Disk:
        """By disk name, or by image path."""
        row = await self.conn.one(
            rows.DISK_SELECT + " WHERE d.name = {name} OR d.path = {path}",
            {"name": name, "path": canonical_path(name) if "/" in name else name},
        )
        if row is None:
            raise NotFound(f"no disk named {name!r} (see `vmshield disk list`)")
        return rows.disk(row)

    async def list_disks(self, vm: str | None = None) -> list[Disk]:
        if vm is None:
            found = await self.conn.all(rows.DISK_SELECT + " ORDER BY d.name")
        else:
            await self._vm_uuid(vm)
            found = await self.conn.all(
                rows.DISK_SELECT + " WHERE v.name = {vm} ORDER BY d.name", {"vm": vm}
            )
        return [rows.disk(r) for r in found]

    async def set_disk_state(
        self,
        name: str,
        state: DiskState,
        *,
        actor: str,
        expect: DiskState | Sequence[DiskState] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Disk:
        """Move a disk to `state`; with `expect`, only from those states (compare-and-set:
        an erase job uses `expect=READY` to claim a disk atomically)."""
        disk = await self.get_disk(name)
        allowed = (
            None
            if expect is None
            else (
                [DiskState(expect)] if isinstance(expect, str) else [DiskState(e) for e in expect]
            )
        )
        async with self.conn.write():
            row = await self.conn.one("SELECT state FROM disks WHERE id = {id}", {"id": disk.id})
            current = DiskState(row[0])  # type: ignore[index]
            if allowed is not None and current not in allowed:
                raise Conflict(
                    f"disk {name!r} is {current.value}, expected "
                    f"{' or '.join(a.value for a in allowed)}"
                )
            await self.conn.run(
                "UPDATE disks SET state = {state} WHERE id = {id}",
                {"state": DiskState(state).value, "id": disk.id},
            )
            await self._audit(
                actor,
                "disk.state",
                disk.vm,
                {
                    "disk": disk.name,
                    "from": current.value,
                    "to": DiskState(state).value,
                    **(detail or {}),
                },
            )
        return await self.get_disk(disk.name)

    async def forget_disk(self, name: str, *, actor: str) -> Disk:
        """Delete the disk's row (the image file is not touched)."""
        disk = await self.get_disk(name)
        async with self.conn.write():
            if await self._exists("SELECT 1 FROM servers WHERE disk_id = {id}", id=disk.id):
                raise Conflict(f"disk {name!r} is being served: `vmshield disk stop {name}`")
            await self.conn.run("DELETE FROM disks WHERE id = {id}", {"id": disk.id})
            await self._audit(actor, "disk.forget", disk.vm, {"disk": disk.name, "path": disk.path})
        return disk

    # -- servers ----------------------------------------------------------------------------

    async def record_server(
        self, disk: str, *, socket: str, pidfile: str, pid: int, readonly: bool, actor: str
    ) -> Server:
        d = await self.get_disk(disk)
        async with self.conn.write():
            await self.conn.run(
                "DELETE FROM servers WHERE disk_id = {id} OR socket = {socket}",
                {"id": d.id, "socket": socket},
            )
            await self.conn.run(
                "INSERT INTO servers (disk_id, socket, pidfile, pid, readonly, started) "
                "VALUES ({id}, {socket}, {pidfile}, {pid}, {ro}, {now})",
                {
                    "id": d.id, "socket": socket, "pidfile": pidfile, "pid": pid,
                    "ro": int(readonly), "now": self._now(),
                },
            )  # fmt: skip
            await self._audit(
                actor,
                "disk.serve",
                d.vm,
                {"disk": d.name, "socket": socket, "pid": pid, "readonly": readonly},
            )
        server = await self.get_server(d.name)
        assert server is not None
        return server

    async def get_server(self, disk: str) -> Server | None:
        row = await self.conn.one(rows.SERVER_SELECT + " WHERE d.name = {disk}", {"disk": disk})
        return None if row is None else rows.server(row)

    async def list_servers(self) -> list[Server]:
        return [
            rows.server(r) for r in await self.conn.all(rows.SERVER_SELECT + " ORDER BY d.name")
        ]

    async def remove_server(self, disk: str, *, actor: str) -> Server | None:
        d = await self.get_disk(disk)
        server = await self.get_server(d.name)
        if server is None:
            return None
        async with self.conn.write():
            await self.conn.run("DELETE FROM servers WHERE disk_id = {id}", {"id": d.id})
            await self._audit(actor, "disk.stop", d.vm, {"disk": d.name, "pid": server.pid})
        return server

    # -- erase permissions ------------------------------------------------------------------

    async def get_erase_permission(self, vm: str) -> ErasePermission:
        """Whether the VM's disks may be deep-erased / normally deleted (table 5-2)."""
        v = await self.get_vm(vm)
        row = await self.conn.one(
            "SELECT deep_erase, normal_delete FROM erase_permissions WHERE vm_uuid = {uuid}",
            {"uuid": v.uuid},
        )
        deep, normal = DEFAULT_ERASE_PERMISSION if row is None else (bool(row[0]), bool(row[1]))
        return ErasePermission(v.name, deep, normal)

    async def set_erase_permission(
        self,
        vm: str,
        *,
        actor: str,
        deep_erase: bool | None = None,
        normal_delete: bool | None = None,
    ) -> ErasePermission:
        cur_perm = await self.get_erase_permission(vm)
        v = await self.get_vm(vm)
        deep = cur_perm.deep_erase if deep_erase is None else deep_erase
        normal = cur_perm.normal_delete if normal_delete is None else normal_delete
        async with self.conn.write():
            await self.conn.run(
                "INSERT INTO erase_permissions (vm_uuid, deep_erase, normal_delete, updated) "
                "VALUES ({uuid}, {deep}, {normal}, {now}) ON CONFLICT (vm_uuid) DO UPDATE "
                "SET deep_erase = excluded.deep_erase, normal_delete = excluded.normal_delete, "
                "updated = excluded.updated",
                {"uuid": v.uuid, "deep": int(deep), "normal": int(normal), "now": self._now()},
            )
            await self._audit(
                actor, "perm.set", v.name, {"deep_erase": deep, "normal_delete": normal}
            )
        return ErasePermission(v.name, deep, normal)

    # -- USB rules --------------------------------------------------------------------------

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
    ) -> UsbRule:
        """Insert a rule at 1-based `position` (default: last); later rules move down.

        `expect`: the ids of the VM's rules, in order, that the caller chose `position`
        against; if they are not the rules now (another admin changed them meanwhile),
        Conflict, checked inside the write transaction (serialized: SQLite's write lock,
        PostgreSQL's audit head lock), so the placement and the insert are one step."""
        for v, bits in ((vendor_id, 16), (product_id, 16), (device_class, 8)):
            if v is not None and not 0 <= v < (1 << bits):
                raise ValueError(f"USB id {v} out of range")
        vm_uuid = await self._vm_uuid(vm)
        async with self.conn.write():
            if expect is not None:
                now = [
                    int(r[0])
                    for r in await self.conn.all(
                        "SELECT id FROM usb_rules WHERE vm_uuid = {uuid} ORDER BY position",
                        {"uuid": vm_uuid},
                    )
                ]
                if now != list(expect):
                    raise Conflict(f"the USB rules of VM {vm} changed while this rule was placed")
            row = await self.conn.one(
                "SELECT count(*) FROM usb_rules WHERE vm_uuid = {uuid}", {"uuid": vm_uuid}
            )
            count = int(row[0])  # type: ignore[index]
            pos = count + 1 if position is None else position
            if not 1 <= pos <= count + 1:
                raise ValueError(f"position must be between 1 and {count + 1}")
            await self.conn.run(
                "UPDATE usb_rules SET position = position + 1 "
                "WHERE vm_uuid = {uuid} AND position >= {pos}",
                {"uuid": vm_uuid, "pos": pos},
            )
            new = await self.conn.one(
                "INSERT INTO usb_rules (vm_uuid, position, action, vendor_id, product_id, "
                "device_class, interfaces, serial, created) VALUES ({uuid}, {pos}, {action}, "
                "{vid}, {pid}, {dclass}, {ifaces}, {serial}, {now}) RETURNING id",
                {
                    "uuid": vm_uuid, "pos": pos, "action": UsbAction(action).value,
                    "vid": vendor_id, "pid": product_id, "dclass": device_class,
                    "ifaces": rows.encode_patterns(interfaces), "serial": serial,
                    "now": self._now(),
                },
            )  # fmt: skip
            rule = UsbRule(
                UsbAction(action),
                vendor_id,
                product_id,
                device_class,
                None if interfaces is None else tuple(interfaces),
                serial,
                id=int(new[0]),  # type: ignore[index]
                vm=vm,
                position=pos,
            )
            await self._audit(actor, "usb.rule.add", vm, {"rule": rule.describe(), "position": pos})
        return rule

    async def list_usb_rules(self, vm: str) -> list[UsbRule]:
        await self._vm_uuid(vm)
        return [rows.usb_rule(r) for r in await self.conn.all(rows.RULES, {"vm": vm})]

    async def remove_usb_rule(self, vm: str, position: int, *, actor: str) -> UsbRule:
        vm_uuid = await self._vm_uuid(vm)
        async with self.conn.write():
            rules = [rows.usb_rule(r) for r in await self.conn.all(rows.RULES, {"vm": vm})]
            match = [r for r in rules if r.position == position]
            if not match:
                raise NotFound(f"VM {vm!r} has no USB rule #{position} (see `vmshield usb list`)")
            await self.conn.run("DELETE FROM usb_rules WHERE id = {id}", {"id": match[0].id})
            await self.conn.run(
                "UPDATE usb_rules SET position = position - 1 "
                "WHERE vm_uuid = {uuid} AND position > {pos}",
                {"uuid": vm_uuid, "pos": position},
            )
            await self._audit(
                actor, "usb.rule.remove", vm, {"rule": match[0].describe(), "position": position}
            )
        return match[0]

    # -- audit ------------------------------------------------------------------------------

    async def append_audit(
        self, actor: str, action: str, vm: str | None = None, detail: dict[str, Any] | None = None
    ) -> AuditEntry:
        async with self.conn.write():
            return await self._audit(actor, action, vm, detail)

    async def list_audit(self, vm: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        """Oldest first; with `limit`, the most recent `limit` rows."""
        where = "WHERE vm = {vm}" if vm else ""
        template = f"SELECT * FROM ({rows.AUDIT_SELECT} {where} ORDER BY seq DESC"
        template += f" LIMIT {int(limit)}) AS a ORDER BY seq" if limit else ") AS a ORDER BY seq"
        found = await self.conn.all(template, {"vm": vm} if vm else None)
        return [auditmod.entry_from_row(r) for r in found]

    async def verify_audit(self, anchor: str | None = None) -> auditmod.VerifyResult:
        async with self.conn.snapshot():
            chain = await self.conn.all(rows.AUDIT_SELECT + " ORDER BY seq")
            head = await self.conn.recorded_head()
        return auditmod.verify_rows(chain, head, anchor)


__all__ = ["Clock", "StoreRepository"]
