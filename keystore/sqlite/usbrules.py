"""USB rules of a VM from an SQLite keystore, for usbgate: a one-shot read and a watcher.

The rules are usbgate.rules.policy's (keystore.models.UsbRule is a Rule with its row id, VM and
position); the repository writes them (keystore.storage.repository). Rules are ordered;
the first rule that matches decides.

Reader API (synchronous, no event loop needed; each call is one short read transaction):

    rules = load_rules(db_path, "web1")          # list[UsbRule], in order
    watcher = RulesWatcher(db_path, "web1")      # keeps one read-only connection open
    new = watcher.poll()                         # None, or the new list if rules changed

`poll()` costs one `PRAGMA data_version` when nothing in the file changed (a few
microseconds), so it can run every 10-20 ms to meet the 50 ms revocation target.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from keystore.errors import KeystoreError, NotFound
from keystore.models import UsbRule
from keystore.sqlite import connection as dbmod
from keystore.storage import rows
from keystore.storage.dialect import SQLITE


def _load(conn: sqlite3.Connection, vm: str, path: Path) -> list[UsbRule]:
    try:
        conn.execute("BEGIN")
        try:
            if conn.execute(SQLITE.sql(rows.VM_EXISTS), {"vm": vm}).fetchone() is None:
                raise NotFound(f"no VM named {vm!r} in keystore {path}")
            return [rows.usb_rule(r) for r in conn.execute(SQLITE.sql(rows.RULES), {"vm": vm})]
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


class HostRulesWatcher:
    """One read-only connection watching the rules of many VMs (a usbgate serving a host).

    One `PRAGMA data_version` per `poll()` whatever the number of VMs; when another
    connection committed, every VM's rules are re-read in one transaction and only the
    VMs whose rules differ are returned. A VM that cannot be read (removed) is reported once
    as its KeystoreError and read again at the next commit. Not thread-safe.
    """

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(db_path)
        self._conn = dbmod.open_sync(self.path, readonly=True)
        self._version = self._data_version()
        self.rules: dict[str, list[UsbRule] | None] = {}  # None: unreadable last time

    def _data_version(self) -> int:
        try:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e

    def watch(self, vm: str) -> list[UsbRule]:
        """Start watching `vm`; its current rules (NotFound if there is no such VM)."""
        rules = _load(self._conn, vm, self.path)
        self.rules[vm] = rules
        return rules

    def forget(self, vm: str) -> None:
        self.rules.pop(vm, None)

    def poll(self) -> dict[str, list[UsbRule] | KeystoreError]:
        """The VMs whose rules changed since the last poll: their new rules, or the error
        that keeps them from being read. Empty when nothing was committed meanwhile."""
        version = self._data_version()
        if version == self._version:
            return {}
        self._version = version
        names, by_vm = self._load_all()
        changed: dict[str, list[UsbRule] | KeystoreError] = {}
        for vm, old in list(self.rules.items()):
            if vm not in names:
                if old is not None:
                    changed[vm] = NotFound(f"no VM named {vm!r} in keystore {self.path}")
                self.rules[vm] = None
                continue
            rules = by_vm.get(vm, [])
            if rules != old:
                changed[vm] = rules
            self.rules[vm] = rules
        return changed

    def _load_all(self) -> tuple[set[str], dict[str, list[UsbRule]]]:
        """Every VM's name and rules, in one read transaction (two queries, not two per VM)."""
        by_vm: dict[str, list[UsbRule]] = {}
        try:
            self._conn.execute("BEGIN")
            try:
                names = {str(r[0]) for r in self._conn.execute("SELECT name FROM vms")}
                for row in self._conn.execute(SQLITE.sql(rows.ALL_RULES)):
                    rule = rows.usb_rule(row)
                    by_vm.setdefault(rule.vm, []).append(rule)
            finally:
                self._conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e
        return names, by_vm

    def close(self) -> None:
        self._conn.close()


__all__ = ["HostRulesWatcher", "RulesWatcher", "UsbRule", "load_rules"]
