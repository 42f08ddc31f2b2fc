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

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from keystore.errors import KeystoreError, NotFound
from keystore.models import UsbRule
from keystore.sqlite import connection as dbmod
from keystore.storage import rows
from keystore.storage.dialect import SQLITE


@contextlib.contextmanager
def _reading(conn: sqlite3.Connection, path: Path) -> Iterator[sqlite3.Connection]:
    """One read transaction on `conn`; sqlite3 errors become the keystore's (translate)."""
    try:
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise dbmod.translate(e, path) from e


def _load(conn: sqlite3.Connection, vm: str, path: Path) -> list[UsbRule]:
    with _reading(conn, path):
        if conn.execute(SQLITE.sql(rows.VM_EXISTS), {"vm": vm}).fetchone() is None:
            raise NotFound(f"no VM named {vm!r} in keystore {path}")
        return [rows.usb_rule(r) for r in conn.execute(SQLITE.sql(rows.RULES), {"vm": vm})]


def load_rules(db_path: str | Path, vm: str) -> list[UsbRule]:
    """The ordered rules of VM `vm` (by name). Raises NotFound if the VM does not exist."""
    path = Path(db_path)
    conn = dbmod.open_sync(path, readonly=True)
    try:
        return _load(conn, vm, path)
    finally:
        conn.close()


class _Watcher:
    """One read-only connection and the file's `PRAGMA data_version` as last seen: that
    number changes whenever another connection commits anything to the file."""

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(db_path)
        self._conn = dbmod.open_sync(self.path, readonly=True)
        self._version = self._data_version()

    def _data_version(self) -> int:
        try:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as e:
            raise dbmod.translate(e, self.path) from e

    def _committed(self) -> bool:
        """Has another connection committed since the last call? (one PRAGMA)"""
        version = self._data_version()
        if version == self._version:
            return False
        self._version = version
        return True

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RulesWatcher(_Watcher):
    """Keeps one read-only connection; `poll()` returns the new rules only when they changed.

    `PRAGMA data_version` changes whenever another connection commits anything to the file;
    only then are the rules re-read and compared. Not thread-safe; one per gateway loop.
    """

    def __init__(self, db_path: str | Path, vm: str) -> None:
        super().__init__(db_path)
        self.vm = vm
        self.rules: list[UsbRule] = _load(self._conn, vm, self.path)

    def changed(self) -> bool:
        """Cheap check: has any other connection committed to the file since the last poll?"""
        return self._data_version() != self._version

    def poll(self) -> list[UsbRule] | None:
        """None if the VM's rules are unchanged, else the new ordered list.

        Raises NotFound if the VM was removed (treat as "deny everything").
        """
        if not self._committed():
            return None
        rules = _load(self._conn, self.vm, self.path)
        if rules == self.rules:
            return None
        self.rules = rules
        return rules


class HostRulesWatcher(_Watcher):
    """One read-only connection watching the rules of many VMs (a usbgate serving a host).

    One `PRAGMA data_version` per `poll()` whatever the number of VMs; when another
    connection committed, every VM's rules are re-read in one transaction and only the
    VMs whose rules differ are returned. A VM that cannot be read (removed) is reported once
    as its KeystoreError and read again at the next commit. Not thread-safe.
    """

    def __init__(self, db_path: str | Path) -> None:
        super().__init__(db_path)
        self.rules: dict[str, list[UsbRule] | None] = {}  # None: unreadable last time

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
        if not self._committed():
            return {}
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
        with _reading(self._conn, self.path) as conn:
            names = {str(r[0]) for r in conn.execute("SELECT name FROM vms")}
            for row in conn.execute(SQLITE.sql(rows.ALL_RULES)):
                rule = rows.usb_rule(row)
                by_vm.setdefault(rule.vm, []).append(rule)
        return names, by_vm

    def close(self) -> None:
        self._conn.close()


__all__ = ["HostRulesWatcher", "RulesWatcher", "UsbRule", "load_rules"]
