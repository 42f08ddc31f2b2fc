"""RuleSource and AuditSink on a PostgreSQL keystore shared by many hosts (`--db postgresql://`).

Change notification is pushed, not polled: keystore.postgres.notify.RulesListener holds one
LISTEN connection and re-reads a VM's rules when its NOTIFY arrives (sent at the commit of
`vmshield usb ...` on any host), so the gateway's 10 ms poll is a memory read. While the
connection is down `poll` raises RuleSourceError: the gateway denies every device, new and
attached (it cannot know what was revoked meanwhile), until the listener reconnects and
hands the fresh rules out again.

Audit rows go to the same database through a worker thread and its own connection
(reconnected when lost): the server chains them under the audit head's row lock
(`vmshield_usbgate_audit()`, the usbgate role's only write; the actor is always usbgate).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import psycopg

from keystore.errors import KeystoreError
from keystore.postgres import audit as pgaudit
from keystore.postgres import connection as pgconn
from keystore.postgres.notify import RulesListener
from usbgate.auditing import QueuedAuditSink
from usbgate.errors import RuleSourceError
from usbgate.rules.policy import Rule

log = logging.getLogger(__name__)


class PgRuleSource:
    """The rules of each VM from the PostgreSQL keystore at `url`, pushed by NOTIFY."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.listener = RulesListener(url)

    def load(self, vm: str) -> list[Rule]:
        try:
            return list(self.listener.watch(vm))
        except KeystoreError as exc:
            raise RuleSourceError(str(exc)) from exc

    async def aload(self, vm: str) -> list[Rule]:
        """In a thread: the listener LISTENs and reads the rules on its own thread, which
        takes up to its wake interval (0.1 s), seconds while the database is unreachable."""
        return await asyncio.to_thread(self.load, vm)

    def poll(self, vm: str) -> list[Rule] | None:
        try:
            rows = self.listener.take(vm)
        except KeystoreError as exc:
            raise RuleSourceError(str(exc)) from exc
        return None if rows is None else list(rows)

    def poll_many(self, vms: Iterable[str]) -> dict[str, list[Rule] | RuleSourceError]:
        """Memory reads: the listener thread already re-read the VMs a NOTIFY named."""
        changed: dict[str, list[Rule] | RuleSourceError] = {}
        for vm in vms:
            try:
                rows = self.listener.take(vm)
            except KeystoreError as exc:
                changed[vm] = RuleSourceError(str(exc))
                continue
            if rows is not None:
                changed[vm] = list(rows)
        return changed

    def forget(self, vm: str) -> None:
        self.listener.unwatch(vm)

    def close(self) -> None:
        self.listener.close()


class PgAuditSink(QueuedAuditSink):
    """Appends each record to the shared hash chain from a worker thread, in order."""

    def __init__(self, url: str, *, max_per_vm: int | None = None) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None
        super().__init__(max_per_vm=max_per_vm)

    def _write(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        for attempt in (1, 2):  # a dropped connection is reopened once per row
            try:
                if self._conn is None:
                    self._conn = pgconn.connect_sync(self.url)
                pgaudit.append_usbgate_sync(self._conn, action, vm, detail)
                return
            except psycopg.OperationalError:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise

    def _finish(self) -> None:
        if self._conn is not None:
            self._conn.close()
