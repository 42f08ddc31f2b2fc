"""The SQLite (aiosqlite) implementation of `keystore.repository.Repository`.

Split in three: sqlite_base (connection, transactions, audit rows), sqlite_principals
(users and authentication), and this module (VMs, disks, servers, permissions, USB rules,
audit queries).
"""

from __future__ import annotations

import sqlite3
import uuid as uuidlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from keystore import audit as auditmod
from keystore.auth import AuthPolicy
from keystore.errors import AlreadyExists, Conflict, KeystoreError, NotFound
from keystore.models import (
    DEFAULT_ERASE_PERMISSION,
    UNLOCK_POLICIES,
    AuditEntry,
    Disk,
    DiskState,
    ErasePermission,
    Server,
    UsbAction,
    Vm,
)
from keystore.repository import canonical_path, check_name
from keystore.sqlite import connection as dbmod
from keystore.sqlite import usbrules
from keystore.sqlite.base import Clock, dt
from keystore.sqlite.principals import PrincipalStore
from keystore.sqlite.usbrules import Pattern, UsbRule

_VM_COLS = (
    "uuid, name, owner, pool_uuid, domain_uuid, created, last_access, access_count, unlock_policy"
)
_DISK_SQL = (
    "SELECT d.id, d.name, v.name, d.path, d.format, d.cipher, d.size, d.state, d.created, "
    "d.luks_uuid, d.st_dev, d.st_ino FROM disks d JOIN vms v ON v.uuid = d.vm_uuid"
)
_SERVER_SQL = (
    "SELECT d.name, s.socket, s.pidfile, s.pid, s.readonly, s.started "
    "FROM servers s JOIN disks d ON d.id = s.disk_id"
)


def _vm(row: sqlite3.Row) -> Vm:
    uuid, name, owner, pool, dom, created, last, count, policy = tuple(row)
    return Vm(
        uuid, name, owner, pool, dom, datetime.fromisoformat(created), dt(last), count, policy
    )


def _disk(row: sqlite3.Row) -> Disk:
    did, name, vm, path, fmt, cipher, size, state, created, uuid, dev, ino = tuple(row)
    return Disk(
        did, name, vm, path, fmt, cipher, size, DiskState(state), datetime.fromisoformat(created),
        uuid, None if dev is None else int(dev), None if ino is None else int(ino),
    )  # fmt: skip


def _server(row: sqlite3.Row) -> Server:
    disk, sock, pidfile, pid, ro, started = tuple(row)
    return Server(disk, sock, pidfile, pid, bool(ro), datetime.fromisoformat(started))


class SqliteRepository(PrincipalStore):
    """Keystore backed by one SQLite file. Use `await SqliteRepository.open(path)`."""

    @classmethod
    async def open(
        cls, path: str | Path, *, policy: AuthPolicy | None = None, clock: Clock = auditmod.now
    ) -> SqliteRepository:
        """Open an existing keystore (see `keystore.sqlite.connection.initialise` to create one)."""
        p = Path(path)
        conn = await dbmod.open_async(p)
        return cls(conn, p, policy=policy or AuthPolicy(), clock=clock)

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
        async with self._write() as db:
            if not await self._exists("SELECT 1 FROM principals WHERE name = ?", owner):
                raise NotFound(f"no user named {owner!r}: create it with `vmshield user add`")
            if await self._exists("SELECT 1 FROM vms WHERE name = ? OR uuid = ?", name, vm_uuid):
                raise AlreadyExists(f"a VM named {name!r} or with uuid {vm_uuid} already exists")
            await db.execute(
                f"INSERT INTO vms ({_VM_COLS}) VALUES (?, ?, ?, ?, ?, ?, NULL, 0, 'any')",
                (vm_uuid, name, owner, pool, dom, self._now()),
            )
            deep, normal = DEFAULT_ERASE_PERMISSION
            await db.execute(
                "INSERT INTO erase_permissions VALUES (?, ?, ?, ?)",
                (vm_uuid, int(deep), int(normal), self._now()),
            )
            await self._audit(
                db,
                actor,
                "vm.add",
                name,
                {"uuid": vm_uuid, "owner": owner, "pool_uuid": pool, "domain_uuid": dom},
            )
        return await self.get_vm(name)

    async def get_vm(self, name: str) -> Vm:
        row = await self._one(
            f"SELECT {_VM_COLS} FROM vms WHERE name = ? OR uuid = ?", (name, name)
        )
        if row is None:
            raise NotFound(f"no VM named {name!r} (see `vmshield vm list`)")
        return _vm(row)

    async def list_vms(self, owner: str | None = None) -> list[Vm]:
        if owner is None:
            rows = await self._all(f"SELECT {_VM_COLS} FROM vms ORDER BY name")
        else:
            rows = await self._all(
                f"SELECT {_VM_COLS} FROM vms WHERE owner = ? ORDER BY name", (owner,)
            )
        return [_vm(r) for r in rows]

    async def remove_vm(self, name: str, *, actor: str) -> Vm:
        vm = await self.get_vm(name)
        async with self._write() as db:
            async with db.execute(
                "SELECT name FROM disks WHERE vm_uuid = ? AND state != 'destroyed'", (vm.uuid,)
            ) as cur:
                live = [r[0] for r in await cur.fetchall()]
            if live:
                raise Conflict(
                    f"VM {vm.name!r} still has disks {', '.join(live)}: destroy them first "
                    "(`vmshield disk destroy`), or forget them (`vmshield disk forget`)"
                )
            await db.execute("DELETE FROM disks WHERE vm_uuid = ?", (vm.uuid,))
            await db.execute("DELETE FROM vms WHERE uuid = ?", (vm.uuid,))
            await self._audit(db, actor, "vm.remove", vm.name, {"uuid": vm.uuid})
        return vm

    async def record_access(self, vm: str) -> Vm:
        """Set last access to now and add one to the access count."""
        async with self._write() as db:
            cur = await db.execute(
                "UPDATE vms SET last_access = ?, access_count = access_count + 1 "
                "WHERE name = ? OR uuid = ?",
                (self._now(), vm, vm),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no VM named {vm!r}")
        return await self.get_vm(vm)

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
        async with self._write() as db:
            if await self._exists("SELECT 1 FROM disks WHERE name = ? OR path = ?", name, path):
                raise AlreadyExists(f"a disk named {name!r} or with path {path} already exists")
            await db.execute(
                "INSERT INTO disks (name, vm_uuid, path, format, cipher, size, state, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, vm_uuid, path, fmt, cipher, size, DiskState(state).value, self._now()),
            )
            await self._audit(
                db,
                actor,
                "disk.add",
                vm,
                {
                    "disk": name,
                    "path": path,
                    "format": fmt,
                    "cipher": cipher,
                    "size": size,
                    "state": DiskState(state).value,
                },
            )
        return await self.get_disk(name)

    async def set_disk_identity(
        self, name: str, *, luks_uuid: str, st_dev: int, st_ino: int, actor: str
    ) -> Disk:
        """Record what the disk's image is (after creating or importing it)."""
        async with self._write() as db:
            cur = await db.execute(
                "UPDATE disks SET luks_uuid = ?, st_dev = ?, st_ino = ? WHERE name = ?",
                (luks_uuid, st_dev, st_ino, name),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no disk named {name!r} (see `vmshield disk list`)")
            disk = await self._one(_DISK_SQL + " WHERE d.name = ?", (name,))
            detail = {"disk": name, "luks_uuid": luks_uuid, "st_dev": st_dev, "st_ino": st_ino}
            await self._audit(db, actor, "disk.identity", _disk(disk).vm if disk else None, detail)
        return await self.get_disk(name)

    async def get_disk(self, name: str) -> Disk:
        """By disk name, or by image path."""
        row = await self._one(
            _DISK_SQL + " WHERE d.name = ? OR d.path = ?",
            (name, canonical_path(name) if "/" in name else name),
        )
        if row is None:
            raise NotFound(f"no disk named {name!r} (see `vmshield disk list`)")
        return _disk(row)

    async def list_disks(self, vm: str | None = None) -> list[Disk]:
        if vm is None:
            rows = await self._all(_DISK_SQL + " ORDER BY d.name")
        else:
            await self._vm_uuid(vm)
            rows = await self._all(_DISK_SQL + " WHERE v.name = ? ORDER BY d.name", (vm,))
        return [_disk(r) for r in rows]

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
        async with self._write() as db:
            async with db.execute("SELECT state FROM disks WHERE id = ?", (disk.id,)) as cur:
                row = await cur.fetchone()
            current = DiskState(row[0])  # type: ignore[index]
            if allowed is not None and current not in allowed:
                raise Conflict(
                    f"disk {name!r} is {current.value}, expected "
                    f"{' or '.join(a.value for a in allowed)}"
                )
            await db.execute(
                "UPDATE disks SET state = ? WHERE id = ?", (DiskState(state).value, disk.id)
            )
            await self._audit(
                db,
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
        async with self._write() as db:
            if await self._exists("SELECT 1 FROM servers WHERE disk_id = ?", disk.id):
                raise Conflict(f"disk {name!r} is being served: `vmshield disk stop {name}`")
            await db.execute("DELETE FROM disks WHERE id = ?", (disk.id,))
            await self._audit(
                db, actor, "disk.forget", disk.vm, {"disk": disk.name, "path": disk.path}
            )
        return disk

    # -- servers ----------------------------------------------------------------------------

    async def record_server(
        self, disk: str, *, socket: str, pidfile: str, pid: int, readonly: bool, actor: str
    ) -> Server:
        d = await self.get_disk(disk)
        async with self._write() as db:
            await db.execute("DELETE FROM servers WHERE disk_id = ? OR socket = ?", (d.id, socket))
            await db.execute(
                "INSERT INTO servers VALUES (?, ?, ?, ?, ?, ?)",
                (d.id, socket, pidfile, pid, int(readonly), self._now()),
            )
            await self._audit(
                db,
                actor,
                "disk.serve",
                d.vm,
                {"disk": d.name, "socket": socket, "pid": pid, "readonly": readonly},
            )
        server = await self.get_server(d.name)
        assert server is not None
        return server

    async def get_server(self, disk: str) -> Server | None:
        row = await self._one(_SERVER_SQL + " WHERE d.name = ?", (disk,))
        return None if row is None else _server(row)

    async def list_servers(self) -> list[Server]:
        return [_server(r) for r in await self._all(_SERVER_SQL + " ORDER BY d.name")]

    async def remove_server(self, disk: str, *, actor: str) -> Server | None:
        d = await self.get_disk(disk)
        server = await self.get_server(d.name)
        if server is None:
            return None
        async with self._write() as db:
            await db.execute("DELETE FROM servers WHERE disk_id = ?", (d.id,))
            await self._audit(db, actor, "disk.stop", d.vm, {"disk": d.name, "pid": server.pid})
        return server

    # -- erase permissions ------------------------------------------------------------------

    async def get_erase_permission(self, vm: str) -> ErasePermission:
        """Whether the VM's disks may be deep-erased / normally deleted (table 5-2)."""
        v = await self.get_vm(vm)
        row = await self._one(
            "SELECT deep_erase, normal_delete FROM erase_permissions WHERE vm_uuid = ?", (v.uuid,)
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
        async with self._write() as db:
            await db.execute(
                "INSERT OR REPLACE INTO erase_permissions VALUES (?, ?, ?, ?)",
                (v.uuid, int(deep), int(normal), self._now()),
            )
            await self._audit(
                db, actor, "perm.set", v.name, {"deep_erase": deep, "normal_delete": normal}
            )
        return ErasePermission(v.name, deep, normal)

    async def set_unlock_policy(self, vm: str, policy: str, *, actor: str) -> Vm:
        if policy not in UNLOCK_POLICIES:
            raise ValueError(f"unlock policy {policy!r}: use one of {', '.join(UNLOCK_POLICIES)}")
        v = await self.get_vm(vm)
        async with self._write() as db:
            await db.execute("UPDATE vms SET unlock_policy = ? WHERE uuid = ?", (policy, v.uuid))
            await self._audit(db, actor, "vm.set", v.name, {"unlock": policy})
        return await self.get_vm(v.uuid)

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
        async with self._write() as db:
            if expect is not None:
                async with db.execute(
                    "SELECT id FROM usb_rules WHERE vm_uuid = ? ORDER BY position", (vm_uuid,)
                ) as cur:
                    now = [int(r[0]) for r in await cur.fetchall()]
                if now != list(expect):
                    raise Conflict(f"the USB rules of VM {vm} changed while this rule was placed")
            async with db.execute(
                "SELECT count(*) FROM usb_rules WHERE vm_uuid = ?", (vm_uuid,)
            ) as cur:
                count = int((await cur.fetchone())[0])  # type: ignore[index]
            pos = count + 1 if position is None else position
            if not 1 <= pos <= count + 1:
                raise ValueError(f"position must be between 1 and {count + 1}")
            await db.execute(
                "UPDATE usb_rules SET position = position + 1 WHERE vm_uuid = ? AND position >= ?",
                (vm_uuid, pos),
            )
            cur2 = await db.execute(
                "INSERT INTO usb_rules (vm_uuid, position, action, vendor_id, product_id, "
                "device_class, interfaces, serial, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    vm_uuid,
                    pos,
                    UsbAction(action).value,
                    vendor_id,
                    product_id,
                    device_class,
                    usbrules.encode_patterns(interfaces),
                    serial,
                    self._now(),
                ),
            )
            rule = UsbRule(
                UsbAction(action),
                vendor_id,
                product_id,
                device_class,
                None if interfaces is None else tuple(interfaces),
                serial,
                id=int(cur2.lastrowid or 0),
                vm=vm,
                position=pos,
            )
            await self._audit(
                db, actor, "usb.rule.add", vm, {"rule": rule.describe(), "position": pos}
            )
        return rule

    async def list_usb_rules(self, vm: str) -> list[UsbRule]:
        await self._vm_uuid(vm)
        return [usbrules.rule_from_row(r) for r in await self._all(usbrules.RULES_SQL, (vm,))]

    async def remove_usb_rule(self, vm: str, position: int, *, actor: str) -> UsbRule:
        vm_uuid = await self._vm_uuid(vm)
        async with self._write() as db:
            async with db.execute(usbrules.RULES_SQL, (vm,)) as cur:
                rules = [usbrules.rule_from_row(r) for r in await cur.fetchall()]
            match = [r for r in rules if r.position == position]
            if not match:
                raise NotFound(f"VM {vm!r} has no USB rule #{position} (see `vmshield usb list`)")
            await db.execute("DELETE FROM usb_rules WHERE id = ?", (match[0].id,))
            await db.execute(
                "UPDATE usb_rules SET position = position - 1 WHERE vm_uuid = ? AND position > ?",
                (vm_uuid, position),
            )
            await self._audit(
                db,
                actor,
                "usb.rule.remove",
                vm,
                {"rule": match[0].describe(), "position": position},
            )
        return match[0]

    # -- audit ------------------------------------------------------------------------------

    async def append_audit(
        self, actor: str, action: str, vm: str | None = None, detail: dict[str, Any] | None = None
    ) -> AuditEntry:
        async with self._write() as db:
            return await self._audit(db, actor, action, vm, detail)

    async def list_audit(self, vm: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        """Oldest first; with `limit`, the most recent `limit` rows."""
        where, params = ("WHERE vm = ?", [vm]) if vm else ("", [])
        sql = f"SELECT * FROM ({auditmod.SELECT_SQL} {where} ORDER BY seq DESC"
        sql += f" LIMIT {int(limit)}) ORDER BY seq" if limit else ") ORDER BY seq"
        return [auditmod.entry_from_row(r) for r in await self._all(sql, params)]

    async def verify_audit(self, anchor: str | None = None) -> auditmod.VerifyResult:
        try:
            await self._db.execute("BEGIN")
            try:
                rows = [tuple(r) for r in await self._all(auditmod.SELECT_SQL + " ORDER BY seq")]
                head = await self._one("SELECT value FROM meta WHERE key = ?", (auditmod.HEAD_KEY,))
            finally:
                await self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e
        return auditmod.verify_rows(rows, head[0] if head else None, anchor)


__all__ = ["KeystoreError", "SqliteRepository"]
