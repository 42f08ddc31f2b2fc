"""The keystore schema as ONE ordered list of steps, rendered per dialect.

A step has the DDL both backends share (written once, with the dialect's type names:
`{id}`, `{bigint}`, `{seq}`) and a name under which a backend may add what is its alone
(keystore/sqlite/schema.py: the append-only triggers; keystore/postgres/schema.py: the audit
head, leases, NOTIFY triggers, roles and their guards). A backend's migrations are the steps
that apply to it, in this order; migration N (1-based) takes a database from version N-1 to
N, so SQLite counts 3 versions where PostgreSQL counts 7 (its own steps in between), exactly
the numbers existing keystores carry. Never edit a released step: append one.

Times are UTC ISO 8601 text and booleans 0/1 in both backends, so one repository reads both
and an SQLite keystore copies into PostgreSQL value for value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from keystore.errors import DatabaseUnavailable
from keystore.storage.dialect import Dialect


@dataclasses.dataclass(frozen=True)
class Step:
    """One schema change: `shared` DDL for every backend (may be empty), by `name`."""

    name: str
    shared: str = ""


_BASE = """
CREATE TABLE principals (
    name            TEXT PRIMARY KEY,
    verifier        TEXT NOT NULL,              -- argon2id PHC string (RFC 9106)
    failed_attempts INTEGER NOT NULL DEFAULT 0, -- consecutive failures since last success
    locked_until    TEXT,                       -- refused without checking until then
    created         TEXT NOT NULL,
    last_login      TEXT
);

-- thesis table 5-1
CREATE TABLE vms (
    uuid         TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    owner        TEXT NOT NULL REFERENCES principals(name) ON UPDATE CASCADE,
    pool_uuid    TEXT,                          -- storage pool
    domain_uuid  TEXT,                          -- storage domain
    created      TEXT NOT NULL,
    last_access  TEXT,
    access_count INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE disks (
    id      {id},
    name    TEXT NOT NULL UNIQUE,
    vm_uuid TEXT NOT NULL REFERENCES vms(uuid),
    path    TEXT NOT NULL UNIQUE,
    format  TEXT NOT NULL,
    cipher  TEXT NOT NULL,
    size    {bigint} NOT NULL CHECK (size > 0),
    state   TEXT NOT NULL
            CHECK (state IN ('creating', 'ready', 'destroying', 'destroyed', 'failed')),
    created TEXT NOT NULL
);
CREATE INDEX disks_vm ON disks(vm_uuid);

-- running nbdkit servers started by `vmshield disk serve`
CREATE TABLE servers (
    disk_id  {bigint} PRIMARY KEY REFERENCES disks(id) ON DELETE CASCADE,
    socket   TEXT NOT NULL UNIQUE,
    pidfile  TEXT NOT NULL,
    pid      INTEGER NOT NULL,
    readonly INTEGER NOT NULL CHECK (readonly IN (0, 1)),
    started  TEXT NOT NULL
);

-- thesis table 5-2
CREATE TABLE erase_permissions (
    vm_uuid       TEXT PRIMARY KEY REFERENCES vms(uuid) ON DELETE CASCADE,
    deep_erase    INTEGER NOT NULL CHECK (deep_erase IN (0, 1)),
    normal_delete INTEGER NOT NULL CHECK (normal_delete IN (0, 1)),
    updated       TEXT NOT NULL
);

-- thesis table 5-3, extended with class / interfaces / serial; first match wins
CREATE TABLE usb_rules (
    id           {id},
    vm_uuid      TEXT NOT NULL REFERENCES vms(uuid) ON DELETE CASCADE,
    position     INTEGER NOT NULL,              -- 1-based order within the VM
    action       TEXT NOT NULL CHECK (action IN ('allow', 'block', 'reject')),
    vendor_id    INTEGER,                       -- NULL = '*'
    product_id   INTEGER,                       -- NULL = '*'
    device_class INTEGER,                       -- NULL = any
    interfaces   TEXT,                          -- JSON list of "CC:SS:PP" patterns, NULL = any
    serial       TEXT,                          -- NULL = any
    created      TEXT NOT NULL
);
CREATE INDEX usb_rules_vm ON usb_rules(vm_uuid, position);

-- append-only, each row carries the hash of the previous one
CREATE TABLE audit (
    seq       {seq},
    ts        TEXT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    vm        TEXT,
    detail    TEXT NOT NULL,                    -- canonical JSON object
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_vm ON audit(vm);

-- key/value facts about the database itself (audit head on SQLite, migration notes)
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

#: Every schema change, oldest first (see the module docstring).
STEPS: tuple[Step, ...] = (
    Step("base", _BASE),
    # PostgreSQL: read-only serves take a shared lease, so a disk can have several holders
    Step("shared-leases"),
    # what a disk's image was when it was recorded: `disk destroy` erases only that image
    Step(
        "disk-identity",
        """
ALTER TABLE disks ADD COLUMN luks_uuid TEXT;
ALTER TABLE disks ADD COLUMN st_dev {bigint};
ALTER TABLE disks ADD COLUMN st_ino {bigint};
""",
    ),
    # PostgreSQL: the usbgate role appends only its own rows, moves the head only onto them,
    # then loses every direct write (issue #20)
    Step("usbgate-rows"),
    Step("usbgate-head"),
    Step("usbgate-lockdown"),
    # which unattended ways may open a VM's disks (issue 24: `vmshield vm set VM --unlock`)
    Step(
        "unlock-policy",
        """
ALTER TABLE vms ADD COLUMN unlock_policy TEXT NOT NULL DEFAULT 'any'
    CHECK (unlock_policy IN ('owner', 'network', 'host-key', 'any'));
""",
    ),
)


def migrations(dialect: Dialect, own: Mapping[str, str]) -> tuple[str, ...]:
    """A backend's migrations: each step that has shared DDL or an entry in `own` (the
    backend's own DDL by step name, run after the shared part). MIGRATIONS[i] brings its
    schema from version i to i + 1."""
    unknown = set(own) - {s.name for s in STEPS}
    if unknown:
        raise ValueError(f"no schema step named {sorted(unknown)[0]!r}")
    return tuple(
        dialect.ddl(step.shared) + own.get(step.name, "")
        for step in STEPS
        if step.shared or step.name in own
    )


__all__ = ["STEPS", "Step", "migrations"]


def check_version(version: int, current: int, where: str, *, init: str = "vmshield init") -> None:
    """Refuse a keystore at schema `version` where this vmshield is at `current`:
    newer (upgrade vmshield) or older (run `init`, which migrates it)."""
    if version > current:
        raise DatabaseUnavailable(
            f"keystore {where} has schema version {version}; this vmshield knows only "
            f"up to {current}: upgrade vmshield"
        )
    if version < current:
        raise DatabaseUnavailable(
            f"keystore {where} has schema version {version}, expected {current}: "
            f"run `{init}` to create or upgrade it"
        )
