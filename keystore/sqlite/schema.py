"""The SQLite schema as an ordered list of migrations; `PRAGMA user_version` is the version.

Migration N (1-based) takes a database from version N-1 to N. Never edit a released
migration: append a new one. Times are UTC ISO 8601 strings; booleans are 0/1.
"""

from __future__ import annotations

_V1 = """
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
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    vm_uuid TEXT NOT NULL REFERENCES vms(uuid),
    path    TEXT NOT NULL UNIQUE,
    format  TEXT NOT NULL,
    cipher  TEXT NOT NULL,
    size    INTEGER NOT NULL CHECK (size > 0),
    state   TEXT NOT NULL
            CHECK (state IN ('creating', 'ready', 'destroying', 'destroyed', 'failed')),
    created TEXT NOT NULL
);
CREATE INDEX disks_vm ON disks(vm_uuid);

-- running nbdkit servers started by `vmshield disk serve`
CREATE TABLE servers (
    disk_id  INTEGER PRIMARY KEY REFERENCES disks(id) ON DELETE CASCADE,
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
    id           INTEGER PRIMARY KEY,
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
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    ts        TEXT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    vm        TEXT,
    detail    TEXT NOT NULL,                    -- canonical JSON object
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_vm ON audit(vm);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;

-- key/value facts about the database itself (audit head, creation time)
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# what a disk's image was when it was recorded: `disk destroy` erases only that image
_V2 = """
ALTER TABLE disks ADD COLUMN luks_uuid TEXT;
ALTER TABLE disks ADD COLUMN st_dev INTEGER;
ALTER TABLE disks ADD COLUMN st_ino INTEGER;
"""

# which unattended ways may open a VM's disks (issue 24: `vmshield vm set VM --unlock`)
_V3 = """
ALTER TABLE vms ADD COLUMN unlock_policy TEXT NOT NULL DEFAULT 'any'
    CHECK (unlock_policy IN ('owner', 'network', 'host-key', 'any'));
"""

#: MIGRATIONS[i] brings the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3)

SCHEMA_VERSION = len(MIGRATIONS)
