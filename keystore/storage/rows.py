"""Rows to records and back, and the few statements other readers share with the repository.

The synchronous readers outside the repository (usbgate's rule watchers, the audit
verifier, `keystore migrate`) read the same columns: their statements are here, once, as
dialect templates (keystore.storage.dialect).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from keystore.models import Disk, DiskState, Principal, Server, UsbRule, Vm
from usbgate.rules.policy import Action, Pattern, format_pattern, parse_pattern

AUDIT_COLUMNS = ("seq", "ts", "actor", "action", "vm", "detail", "prev_hash", "hash")
#: the chain in order, for verification and listing
AUDIT_SELECT = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit"
AUDIT_INSERT = (
    f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}) "
    f"VALUES ({', '.join('{' + c + '}' for c in AUDIT_COLUMNS)})"
)
_RULES = (
    "SELECT r.id, v.name, r.position, r.action, r.vendor_id, r.product_id, r.device_class, "
    "r.interfaces, r.serial FROM usb_rules r JOIN vms v ON v.uuid = r.vm_uuid "
)
#: a VM's USB rules in order, by the VM's name or uuid
RULES = _RULES + "WHERE v.name = {vm} ORDER BY r.position"
RULES_BY_UUID = _RULES + "WHERE v.uuid = {uuid} ORDER BY r.position"
#: every VM's rules, grouped by VM (a usbgate serving many VMs re-reads them in one go)
ALL_RULES = _RULES + "ORDER BY v.name, r.position"
VM_EXISTS = "SELECT 1 FROM vms WHERE name = {vm}"

VM_COLUMNS = (
    "uuid, name, owner, pool_uuid, domain_uuid, created, last_access, access_count, unlock_policy"
)
DISK_SELECT = (
    "SELECT d.id, d.name, v.name, d.path, d.format, d.cipher, d.size, d.state, d.created, "
    "d.luks_uuid, d.st_dev, d.st_ino FROM disks d JOIN vms v ON v.uuid = d.vm_uuid"
)
SERVER_SELECT = (
    "SELECT d.name, s.socket, s.pidfile, s.pid, s.readonly, s.started "
    "FROM servers s JOIN disks d ON d.id = s.disk_id"
)
PRINCIPAL_COLUMNS = "name, failed_attempts, locked_until, created, last_login"


def dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def audit_params(row: Sequence[Any]) -> dict[str, Any]:
    """AUDIT_INSERT's parameters from a row in AUDIT_COLUMNS order (keystore.audit.next_row)."""
    return dict(zip(AUDIT_COLUMNS, row, strict=True))


def vm(row: Sequence[Any]) -> Vm:
    uuid, name, owner, pool, dom, created, last, count, policy = row
    return Vm(
        uuid, name, owner, pool, dom, datetime.fromisoformat(created), dt(last), count, policy
    )


def disk(row: Sequence[Any]) -> Disk:
    did, name, vm_, path, fmt, cipher, size, state, created, uuid, dev, ino = row
    return Disk(
        int(did), name, vm_, path, fmt, cipher, int(size), DiskState(state),
        datetime.fromisoformat(created), uuid,
        None if dev is None else int(dev), None if ino is None else int(ino),
    )  # fmt: skip


def server(row: Sequence[Any]) -> Server:
    disk_, sock, pidfile, pid, ro, started = row
    return Server(disk_, sock, pidfile, pid, bool(ro), datetime.fromisoformat(started))


def principal(row: Sequence[Any]) -> Principal:
    name, failed, locked, created, last = row
    return Principal(name, failed, dt(locked), datetime.fromisoformat(created), dt(last))


def encode_patterns(patterns: Iterable[Pattern] | None) -> str | None:
    """The ``interfaces`` column: a JSON list of ``CC:SS:PP`` texts, or NULL for "any"."""
    if patterns is None:
        return None
    return json.dumps([format_pattern(p) for p in patterns])


def usb_rule(row: Sequence[Any]) -> UsbRule:
    """A UsbRule from a row of RULES."""
    rid, vm_, pos, action, vid, pid, dclass, ifaces, serial = row
    patterns = None if ifaces is None else tuple(parse_pattern(p) for p in json.loads(ifaces))
    return UsbRule(
        Action(action), vid, pid, dclass, patterns, serial, id=int(rid), vm=vm_, position=pos
    )
