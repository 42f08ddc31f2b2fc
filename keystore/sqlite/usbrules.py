"""USB whitelist rules of a VM, for the usbgate (reader side) and the CLI (parsing).

This module stores and reads rules; judging a device is usbgate.policy's job (one engine,
so the CLI, the gateway and QEMU's static filter cannot disagree). Rules are ordered; the
first rule that matches decides (`allow`, `block`, `reject`); no match means block. Fields:

- vendor_id / product_id: exact 16-bit ids, `None` for `*`;
- device_class: the device descriptor's bDeviceClass;
- interfaces: (class, subclass, protocol) patterns, `None` parts are `*`; the rule matches
  if *every* interface of the device matches at least one pattern (USBGuard's
  `with-interface`: a rule for `08:06:50` does not let a keyboard interface ride along);
- serial: the iSerialNumber string, exactly.

Reader API (synchronous, no event loop needed; each call is one short read transaction):

    rules = load_rules(db_path, "web1")          # list[UsbRule], in order
    watcher = RulesWatcher(db_path, "web1")      # keeps one read-only connection open
    new = watcher.poll()                         # None, or the new list if rules changed

`poll()` costs one `PRAGMA data_version` when nothing in the file changed (a few
microseconds), so it can run every 10-20 ms to meet the 50 ms revocation target.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from keystore.errors import NotFound
from keystore.models import UsbAction
from keystore.sqlite import connection as dbmod

Pattern = tuple[int | None, int | None, int | None]

_HEX4 = re.compile(r"^[0-9a-fA-F]{1,4}$")
_HEX2 = re.compile(r"^[0-9a-fA-F]{1,2}$")


@dataclasses.dataclass(frozen=True)
class UsbRule:
    """One row of a VM's whitelist (thesis table 5-3, extended)."""

    id: int
    vm: str
    position: int  #: 1-based; lower positions are tried first
    action: UsbAction
    vendor_id: int | None  #: None = any vendor
    product_id: int | None  #: None = any product
    device_class: int | None = None
    interfaces: tuple[Pattern, ...] | None = None
    serial: str | None = None

    def describe(self) -> str:
        """USBGuard-like one-line text, e.g. `allow id 0781:5567 with-interface 08:06:50`."""
        parts = [self.action.value, f"id {format_id(self.vendor_id)}:{format_id(self.product_id)}"]
        if self.device_class is not None:
            parts.append(f"class {self.device_class:02x}")
        if self.interfaces is not None:
            parts.append("with-interface " + " ".join(format_pattern(p) for p in self.interfaces))
        if self.serial is not None:
            parts.append(f'serial "{self.serial}"')
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vm": self.vm,
            "position": self.position,
            "action": self.action.value,
            "vendor_id": format_id(self.vendor_id),
            "product_id": format_id(self.product_id),
            "device_class": None if self.device_class is None else f"{self.device_class:02x}",
            "interfaces": None
            if self.interfaces is None
            else [format_pattern(p) for p in self.interfaces],
            "serial": self.serial,
        }


def format_id(value: int | None) -> str:
    return "*" if value is None else f"{value:04x}"


def format_pattern(p: Pattern) -> str:
    return ":".join("*" if v is None else f"{v:02x}" for v in p)


def parse_id_pair(text: str) -> tuple[int | None, int | None]:
    """Parse `VID:PID` (hex, `*` wildcards), e.g. `0781:5567`, `0781:*`, `*:*`."""
    parts = text.strip().split(":")
    if len(parts) != 2:
        raise ValueError(f"expected VID:PID in hex (e.g. 0781:5567 or 0781:*), got {text!r}")
    out: list[int | None] = []
    for part in parts:
        if part == "*":
            out.append(None)
        elif _HEX4.match(part):
            out.append(int(part, 16))
        else:
            raise ValueError(f"{part!r} in {text!r} is not a 4-digit hex id or '*'")
    return out[0], out[1]


def parse_class(text: str) -> int:
    """Parse a USB class code: hex byte (`08`, `0x08`)."""
    t = text.strip().lower().removeprefix("0x")
    if not _HEX2.match(t):
        raise ValueError(f"USB class must be a hex byte such as 08 or 03, got {text!r}")
    return int(t, 16)


def parse_pattern(text: str) -> Pattern:
    """Parse an interface pattern `CC:SS:PP` (hex bytes, `*` wildcards); `CC` alone = `CC:*:*`."""
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"interface must be CC:SS:PP in hex (e.g. 08:06:50), got {text!r}")
    parts += ["*"] * (3 - len(parts))
    vals: list[int | None] = []
    for part in parts:
        if part == "*":
            vals.append(None)
        elif _HEX2.match(part):
            vals.append(int(part, 16))
        else:
            raise ValueError(f"{part!r} in interface {text!r} is not a hex byte or '*'")
    return vals[0], vals[1], vals[2]


def encode_patterns(patterns: Iterable[Pattern] | None) -> str | None:
    if patterns is None:
        return None
    return json.dumps([format_pattern(p) for p in patterns])


def rule_from_row(row: sqlite3.Row | tuple[Any, ...]) -> UsbRule:
    """Build a UsbRule from a row of RULES_SQL."""
    rid, vm, pos, action, vid, pid, dclass, ifaces, serial = tuple(row)
    patterns = None if ifaces is None else tuple(parse_pattern(p) for p in json.loads(ifaces))
    return UsbRule(rid, vm, pos, UsbAction(action), vid, pid, dclass, patterns, serial)


RULES_SQL = (
    "SELECT r.id, v.name, r.position, r.action, r.vendor_id, r.product_id, r.device_class, "
    "r.interfaces, r.serial FROM usb_rules r JOIN vms v ON v.uuid = r.vm_uuid "
    "WHERE v.name = ? ORDER BY r.position"
)


def _load(conn: sqlite3.Connection, vm: str, path: Path) -> list[UsbRule]:
    try:
        conn.execute("BEGIN")
        try:
            if conn.execute("SELECT 1 FROM vms WHERE name = ?", (vm,)).fetchone() is None:
                raise NotFound(f"no VM named {vm!r} in keystore {path}")
            return [rule_from_row(r) for r in conn.execute(RULES_SQL, (vm,))]
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise dbmod.translate(e, path) from e


def load_rules(db_path: str | Path, vm: str) -> list[UsbRule]:
    """The ordered rules of VM `vm` (by name). Raises NotFound if the VM does not exist."""
    path = Path(db_path)
    conn = dbmod.open_sync(path, readonly=True)
    try:
        return _load(conn, vm, path)
    finally:
        conn.close()


class RulesWatcher:
    """Keeps one read-only connection; `poll()` returns the new rules only when they changed.

    `PRAGMA data_version` changes whenever another connection commits anything to the file;
    only then are the rules re-read and compared. Not thread-safe; one per gateway loop.
    """

    def __init__(self, db_path: str | Path, vm: str) -> None:
        self.path = Path(db_path)
        self.vm = vm
        self._conn = dbmod.open_sync(self.path, readonly=True)
        self._version = self._data_version()
        self.rules: list[UsbRule] = _load(self._conn, vm, self.path)

    def _data_version(self) -> int:
        try:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e

    def changed(self) -> bool:
        """Cheap check: has any other connection committed to the file since the last poll?"""
        return self._data_version() != self._version

    def poll(self) -> list[UsbRule] | None:
        """None if the VM's rules are unchanged, else the new ordered list.

        Raises NotFound if the VM was removed (treat as "deny everything").
        """
        version = self._data_version()
        if version == self._version:
            return None
        self._version = version
        rules = _load(self._conn, self.vm, self.path)
        if rules == self.rules:
            return None
        self.rules = rules
        return rules

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RulesWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
