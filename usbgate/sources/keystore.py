"""RuleSource and AuditSink backed by the vmshield keystore (its usbrules store and audit chain).

The keystore's rules are usbgate.rules.policy rules (``UsbRule`` is a ``Rule`` with a row id, VM and
position), so they are used as loaded: there is nothing to convert.

Change notification: one persistent read-only sqlite3 connection for every VM watched
(keystore.sqlite.usbrules.HostRulesWatcher) whose ``PRAGMA data_version`` is read on every
poll. SQLite changes that number whenever *another* connection, in any process, commits to
the file, so a `vmshield usb ...` commit is seen at the next poll (every 10 ms) for a few
microseconds per poll, however many VMs are watched; the rules are re-read only then.

Audit rows go through keystore.sqlite.audit.append_audit (hash-chained, its own short write
transaction) on one worker thread, in order, through a bounded queue (usbgate.auditing), so
the event loop never waits for the disk and a flood of rows cannot fill memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
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


def keystore_audit_sink(db: str | None, *, max_per_vm: int | None = None) -> AuditSink:
    """The audit chain of `--db` (the default keystore without it); `max_per_vm`: the rows
    one VM may hold in the queue (a usbgate serving many VMs)."""
    location = keystore_location(db)
    if location.file is None:
        from usbgate.sources.postgres import PgAuditSink

        return PgAuditSink(str(location), max_per_vm=max_per_vm)
    return KeystoreAuditSink(location.file, max_per_vm=max_per_vm)


class KeystoreRuleSource:
    """The rules of each VM from the keystore database at ``db_path``, on ONE connection.

    However many VMs it watches (one for `usbgate run`, every VM of the host for `usbgate
    host serve`), a poll is one `PRAGMA data_version`; only after another connection
    committed are the watched VMs' rules re-read (keystore.sqlite.usbrules.HostRulesWatcher).
    A VM whose rules cannot be read (the VM was removed) raises RuleSourceError at every
    poll until a later commit makes them readable again (a VM added back with its rules),
    when they are reported as changed; a lost file does the same for every VM.
    """

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        self._watcher: usbrules.HostRulesWatcher | None = None
        self._vms: set[str] = set()
        self._changed: dict[str, list[Rule]] = {}  # read, not yet handed out
        self._errors: dict[str, str] = {}  # VMs whose rules cannot be read now

    def _watch(self, vm: str) -> list[Rule]:
        try:
            if self._watcher is None:
                self._watcher = usbrules.HostRulesWatcher(self.db_path)
            return list(self._watcher.watch(vm))
        except KeystoreError as exc:
            raise RuleSourceError(str(exc)) from exc

    def load(self, vm: str) -> list[Rule]:
        rules = self._watch(vm)
        self._vms.add(vm)
        self._changed.pop(vm, None)
        self._errors.pop(vm, None)
        return rules

    async def aload(self, vm: str) -> list[Rule]:
        return self.load(vm)  # a local file, sub-millisecond (and its connection is the loop's)

    def forget(self, vm: str) -> None:
        self._vms.discard(vm)
        self._changed.pop(vm, None)
        self._errors.pop(vm, None)
        if self._watcher is not None:
            self._watcher.forget(vm)

    def _collect(self) -> None:
        """Read what changed since the last call into ``_changed`` and ``_errors``."""
        if self._watcher is None:  # lost: open again and read every VM afresh
            for vm in sorted(self._vms):
                try:
                    self._changed[vm] = self._watch(vm)
                    self._errors.pop(vm, None)
                except RuleSourceError as exc:
                    self._errors[vm] = str(exc)
            return
        try:
            polled = self._watcher.poll()
        except KeystoreError as exc:
            self._watcher.close()
            self._watcher = None
            for vm in self._vms:
                self._errors[vm] = str(exc)
                self._changed.pop(vm, None)
            return
        for vm, new in polled.items():
            if isinstance(new, KeystoreError):
                self._errors[vm] = str(new)
                self._changed.pop(vm, None)
            else:
                self._changed[vm] = list(new)
                self._errors.pop(vm, None)

    def _take(self, vm: str) -> list[Rule] | RuleSourceError | None:
        if vm in self._errors:
            return RuleSourceError(self._errors[vm])
        return self._changed.pop(vm, None)

    def poll(self, vm: str) -> list[Rule] | None:
        self._collect()
        got = self._take(vm)
        if isinstance(got, RuleSourceError):
            raise got
        return got

    def poll_many(self, vms: Iterable[str]) -> dict[str, list[Rule] | RuleSourceError]:
        self._collect()
        return {vm: got for vm in vms if (got := self._take(vm)) is not None}

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._vms.clear()


class KeystoreAuditSink(QueuedAuditSink):
    """Appends each record to the keystore's hash-chained audit trail from a worker thread."""

    def __init__(self, db_path: str | Path, *, max_queued: int = MAX_QUEUED,
                 max_per_vm: int | None = None) -> None:  # fmt: skip
        self.db_path = Path(db_path)
        super().__init__(max_queued=max_queued, max_per_vm=max_per_vm)

    def _write(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        keystore_audit.append_audit(self.db_path, AUDIT_ACTOR, action, vm, detail)
