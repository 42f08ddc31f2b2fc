"""Plain records the repository returns. Frozen dataclasses; `to_json()` for `--json`."""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Any

from usbgate.rules.policy import Action, Rule


class DiskState(enum.StrEnum):
    """Life cycle of a disk image recorded in the keystore."""

    CREATING = "creating"  #: image being written by `disk create`
    READY = "ready"  #: image exists and can be served
    DESTROYING = "destroying"  #: an erase job is running on it
    DESTROYED = "destroyed"  #: erased; the row stays as a record
    FAILED = "failed"  #: creation or erase failed; see the audit trail


#: What a USB rule does with a matching device: usbgate.rules.policy's one rule model.
UsbAction = Action


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


class _Record:
    def to_json(self) -> dict[str, Any]:
        """A dict of JSON-serialisable values (datetimes as ISO 8601 strings)."""
        assert dataclasses.is_dataclass(self)
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class Vm(_Record):
    """A virtual machine (thesis table 5-1)."""

    uuid: str
    name: str
    owner: str
    pool_uuid: str | None
    domain_uuid: str | None
    created: datetime
    last_access: datetime | None
    access_count: int
    #: how its disks may open without a password typed: one of UNLOCK_POLICIES
    unlock: str = "any"


#: `vmshield vm set VM --unlock`: which unattended ways may open the VM's disks (an owner's
#: `vm unlock` always may): owner = none, network = a clevis token (Tang/TPM), host-key = the
#: enrolled host key, any = both
UNLOCK_POLICIES = ("owner", "network", "host-key", "any")


@dataclasses.dataclass(frozen=True)
class Disk(_Record):
    """An encrypted disk image of a VM."""

    id: int
    name: str
    vm: str  #: VM name
    path: str
    format: str
    cipher: str
    size: int  #: plaintext size in bytes
    state: DiskState
    created: datetime
    #: what the image was when recorded (LUKS UUID, st_dev, st_ino): destroy compares them
    luks_uuid: str | None = None
    st_dev: int | None = None
    st_ino: int | None = None


@dataclasses.dataclass(frozen=True)
class Principal(_Record):
    """A user who owns VMs. The verifier is never part of this record."""

    name: str
    failed_attempts: int
    locked_until: datetime | None
    created: datetime
    last_login: datetime | None


@dataclasses.dataclass(frozen=True)
class ErasePermission(_Record):
    """What may happen to a VM's disks when they are destroyed (thesis table 5-2).

    deep_erase: the disks may be destroyed by crypto-erase + overwrite.
    normal_delete: the disks may be removed without overwriting (leaves data recoverable
    for whoever can read the raw storage, only crypto-erase protects it).
    """

    vm: str
    deep_erase: bool
    normal_delete: bool


#: Defaults for a VM without an explicit permission row: destroying means deep erase.
DEFAULT_ERASE_PERMISSION = (True, False)


@dataclasses.dataclass(frozen=True)
class Server(_Record):
    """A running (or stale) `nbdkit` serving a disk, as recorded by `disk serve`."""

    disk: str
    socket: str
    pidfile: str
    pid: int
    readonly: bool
    started: datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class UsbRule(Rule):
    """A usbgate.rules.policy rule as one row of a VM's whitelist (thesis table 5-3, extended):
    the one rule model, with its row id, VM and position."""

    id: int
    vm: str
    position: int  #: 1-based; lower positions are tried first

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "vm": self.vm, "position": self.position, **super().to_json()}


@dataclasses.dataclass(frozen=True)
class AuditEntry(_Record):
    """One row of the append-only, hash-chained audit trail."""

    seq: int
    ts: datetime
    actor: str
    action: str
    vm: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str
    #: the real uid of the process that wrote the row, and its name (None in old rows);
    #: stored in the chained detail text, shown apart from the caller's `detail`
    os_uid: int | None = None
    os_user: str | None = None
