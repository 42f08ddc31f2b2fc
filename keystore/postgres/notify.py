"""Live USB rules from PostgreSQL: one LISTEN connection, rules re-read on each NOTIFY.

A trigger on `usb_rules` (and `vms`) NOTIFYs `vmshield_usb_<vm uuid hex>` in the changing
transaction, so the notification is delivered when, and only when, the change commits.
`RulesListener` keeps one connection in a thread, LISTENs on the channel of every VM it
watches, and on each notification re-reads that VM's rules; readers take the new list from
memory (`take`), never waiting for the database.

A lost connection is retried with exponential back-off (50 ms doubling to 2 s). While it is
down `connected` is False and `take` raises Disconnected: the caller must treat the rules as
unknown (usbgate denies every device). After a reconnect every VM's rules are re-read and
handed out again, since notifications sent meanwhile were lost.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg

from keystore.errors import DatabaseUnavailable, KeystoreError, NotFound
from keystore.location import redact
from keystore.models import UsbRule
from keystore.postgres import connection as pgconn
from keystore.storage import rows as storage_rows
from keystore.storage.dialect import POSTGRES

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
_WAKE = 0.1  # seconds between checks for new VMs to LISTEN on


class Disconnected(DatabaseUnavailable):
    """The listener has no database connection right now (it keeps reconnecting)."""


class RulesListener:
    """Watches the USB rules of some VMs in the keystore at `url`; thread-safe."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._uuids: dict[str, str] = {}  # vm name -> uuid
        self._channels: dict[str, str] = {}  # LISTEN channel -> vm name
        self._rules: dict[str, list[UsbRule] | None] = {}  # None: the VM is gone
        self._given: dict[str, list[UsbRule] | None] = {}
        self._pending: set[str] = set()  # VMs not LISTENed on yet
        self._unlisten: set[str] = set()  # channels of VMs no longer watched
        self._stop = threading.Event()
        self._up = threading.Event()
        self.reconnects = 0
        self.last_error = ""
        self._conn: psycopg.Connection[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="vmshield-listen", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._up.wait(timeout)

    def watch(self, vm: str, timeout: float = 10.0) -> list[UsbRule]:
        """Start watching `vm`; its current rules. NotFound, Disconnected on failure."""
        return self.watch_many([vm], timeout)[vm]

    def watch_many(self, vms: list[str], timeout: float = 10.0) -> dict[str, list[UsbRule]]:
        """Start watching every VM in `vms` (one round trip to the listener); their rules."""
        if not self._up.wait(timeout):
            where = redact(self.url)
            raise Disconnected(f"cannot reach keystore {where}: {self.last_error}")
        with self._lock:
            self._pending.update(vm for vm in vms if vm not in self._uuids)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if all(vm in self._rules and vm not in self._pending for vm in vms):
                    missing = [vm for vm in vms if self._rules[vm] is None]
                    for vm in missing:
                        self._forget(vm)
                    if missing:
                        raise NotFound(f"no VM named {missing[0]!r} in keystore {redact(self.url)}")
                    found: dict[str, list[UsbRule]] = {}
                    for vm in vms:
                        rules = self._rules[vm]
                        assert rules is not None
                        self._given[vm] = rules
                        found[vm] = list(rules)
                    return found
            if time.monotonic() > deadline:
                raise Disconnected(f"keystore {redact(self.url)} did not answer")
            time.sleep(0.005)

    def _forget(self, vm: str) -> None:
        uuid = self._uuids.get(vm)
        if uuid is not None:
            self._channels.pop(pgconn.rules_channel(uuid), None)
        for d in (self._uuids, self._rules, self._given):
            d.pop(vm, None)

    def unwatch(self, vm: str) -> None:
        """Stop watching `vm`: its notifications are ignored at once, UNLISTENed soon after."""
        with self._lock:
            uuid = self._uuids.get(vm)
            self._forget(vm)
            self._pending.discard(vm)
            if uuid is not None:
                self._unlisten.add(pgconn.rules_channel(uuid))

    def take(self, vm: str) -> list[UsbRule] | None:
        """The new rules of `vm` if they changed since last handed out, else None.

        Raises Disconnected while the connection is down, NotFound once the VM is removed.
        """
        if not self._up.is_set():
            with self._lock:
                self._given.pop(vm, None)  # hand the rules out again after a reconnect
            raise Disconnected(
                f"lost the connection to keystore {redact(self.url)} "
                f"({self.last_error}); reconnecting"
            )
        with self._lock:
            if vm not in self._rules:
                return None
            rules = self._rules[vm]
            if vm in self._given and self._given[vm] == rules:
                return None
            self._given[vm] = rules
        if rules is None:
            raise NotFound(f"VM {vm!r} was removed from keystore {redact(self.url)}")
        return list(rules)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    # -- the listening thread ---------------------------------------------------------------

    def _run(self) -> None:
        delay = BACKOFF_MIN
        while not self._stop.is_set():
            try:
                self._conn = pgconn.connect_sync(self.url)
                with self._lock:
                    self._pending.update(self._uuids)
                    self._unlisten.clear()  # a new connection LISTENs on watched VMs only
                self._listen_pending(self._conn)
                self._up.set()
                if self.reconnects:
                    log.warning(
                        "keystore connection re-established (reconnect %d)", self.reconnects
                    )
                delay = BACKOFF_MIN
                self._serve(self._conn)
            except (psycopg.Error, KeystoreError) as exc:
                self.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else "?"
                if self._up.is_set():
                    log.error("keystore connection lost: %s", self.last_error)
                    self.reconnects += 1
            finally:
                self._up.clear()
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, BACKOFF_MAX)

    def _serve(self, conn: psycopg.Connection[Any]) -> None:
        while not self._stop.is_set():
            changed = {n.channel for n in conn.notifies(timeout=_WAKE, stop_after=1)}
            for channel in changed:
                with self._lock:
                    vm = self._channels.get(channel)
                if vm is not None:
                    self._reload(conn, vm)
            if self._pending:
                self._listen_pending(conn)
            if self._unlisten:
                with self._lock:
                    gone, self._unlisten = self._unlisten, set()
                for channel in sorted(gone - set(self._channels)):
                    conn.execute(f"UNLISTEN {channel}".encode())

    def _listen_pending(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            pending = sorted(self._pending)
        for vm in pending:
            row = conn.execute("SELECT uuid FROM vms WHERE name = %s", (vm,)).fetchone()
            if row is None:
                with self._lock:
                    self._rules[vm] = None
                    self._pending.discard(vm)
                continue
            uuid = str(row[0])
            channel = pgconn.rules_channel(uuid)
            conn.execute(f"LISTEN {channel}".encode())
            with self._lock:
                self._uuids[vm] = uuid
                self._channels[channel] = vm
            self._reload(conn, vm)
            with self._lock:
                self._pending.discard(vm)

    def _reload(self, conn: psycopg.Connection[Any], vm: str) -> None:
        uuid = self._uuids[vm]
        rows = conn.execute(POSTGRES.sql(storage_rows.RULES_BY_UUID), {"uuid": uuid}).fetchall()
        gone = conn.execute("SELECT 1 FROM vms WHERE uuid = %s", (uuid,)).fetchone() is None
        with self._lock:
            self._rules[vm] = None if gone else [storage_rows.usb_rule(r) for r in rows]
