"""RuleSource and AuditSink backed by the vmshield keystore (its usbrules store and audit chain).

The keystore's rules are usbgate.rules.policy rules (``UsbRule`` is a ``Rule`` with a row id, VM and
position), so they are used as loaded: there is nothing to convert.

Change notification: one persistent read-only sqlite3 connection per VM
(keystore.sqlite.usbrules.RulesWatcher) whose ``PRAGMA data_version`` is read on every poll. SQLite
changes that number whenever *another* connection, in any process, commits to the file, so
a `vmshield usb ...` commit is seen at the next poll (every 10 ms) for a few microseconds
per poll; the rules are re-read only then.

Audit rows go through keystore.sqlite.audit.append_audit (hash-chained, its own short write
transaction) on one worker thread, in order, through a bounded queue (usbgate.auditing), so
the event loop never waits for the disk and a flood of rows cannot fill memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from keystore import paths
from keystore.errors import KeystoreError
from keystore.location import Location
from keystore.sqlite import audit as keystore_audit
from keystore.sqlite import usbrules
from usbgate.auditing import MAX_QUEUED, QueuedAuditSink
from usbgate.errors import RuleSourceError
from usbgate.rules.policy import Rule
from usbgate.sources import AuditSink, RuleSource

log = logging.getLogger(__name__)

AUDIT_ACTOR = "usbgate"


def keystore_location(db: str | None) -> Location:
    """`--db` as the keystore reads it (a file path or a postgresql:// URL); without one, the
    keystore's default database."""
    return Location.parse(db if db is not None else paths.default_db_path())


def keystore_rule_source(db: str | None) -> RuleSource:
    """The rules of `--db` (the default keystore without it): the SQLite file's watchers, or
    a PostgreSQL keystore's NOTIFY-driven source."""
    location = keystore_location(db)
    if location.file is None:
        from usbgate.sources.postgres import PgRuleSource

        return PgRuleSource(str(location))
    return KeystoreRuleSource(location.file)


def keystore_audit_sink(db: str | None) -> AuditSink:
    """The audit chain of `--db` (the default keystore without it)."""
    location = keystore_location(db)
    if location.file is None:
        from usbgate.sources.postgres import PgAuditSink

        return PgAuditSink(str(location))
    return KeystoreAuditSink(location.file)


class KeystoreRuleSource:
    """The rules of each VM from the keystore database at ``db_path``.

    If a VM's rules cannot be read (the VM was removed, the file is gone), ``poll`` raises
    RuleSourceError and forgets its watcher; later polls try again and report the rules
    as changed as soon as they can be read (a VM added back with its rules).
    """

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        self._watchers: dict[str, usbrules.RulesWatcher] = {}

    def _new_watcher(self, vm: str) -> usbrules.RulesWatcher:
        try:
            watcher = usbrules.RulesWatcher(self.db_path, vm)
        except KeystoreError as exc:
            raise RuleSourceError(str(exc)) from exc
        self._watchers[vm] = watcher
        return watcher

    def load(self, vm: str) -> list[Rule]:
        watcher = self._watchers.get(vm) or self._new_watcher(vm)
        return list(watcher.rules)

    def poll(self, vm: str) -> list[Rule] | None:
        watcher = self._watchers.get(vm)
        if watcher is None:  # first poll, or the rules were unreadable last time
            return self.load(vm)
        try:
            rows = watcher.poll()
        except KeystoreError as exc:
            watcher.close()
            del self._watchers[vm]
            raise RuleSourceError(str(exc)) from exc
        return None if rows is None else list(rows)

    def close(self) -> None:
        for watcher in self._watchers.values():
            watcher.close()
        self._watchers.clear()


class KeystoreAuditSink(QueuedAuditSink):
    """Appends each record to the keystore's hash-chained audit trail from a worker thread."""

    def __init__(self, db_path: str | Path, *, max_queued: int = MAX_QUEUED) -> None:
        self.db_path = Path(db_path)
        super().__init__(max_queued=max_queued)

    def _write(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        keystore_audit.append_audit(self.db_path, AUDIT_ACTOR, action, vm, detail)
