"""Audit rows without letting a peer fill memory: a bounded writer queue and refusal aggregation.

``QueuedAuditSink`` writes rows on one worker thread, in order, through a bounded queue: when
the store cannot keep up, rows beyond ``max_queued`` are counted, not queued, and one
``usb.audit.dropped`` row with the count follows as soon as the writer catches up. Rows that
say which device reached the guest or was taken from it (``NEVER_DROPPED``) are never
counted away: their ``record`` waits for room, so a peer who floods the queue with denials
first cannot hide the attach that follows (the flood is slowed to the store's pace instead).
When one usbgate serves every VM of the host (`usbgate host`), each VM may hold at most
``MAX_QUEUED_PER_VM`` rows of the shared queue: a VM whose owner floods it has its own rows
counted away, never another VM's.
The keystore and PostgreSQL sinks are such a queue with their own ``_write``.

``Refusals`` turns a flood of refused connections into a bounded number of rows: the first
refusal of a kind from a peer is recorded at once; later ones within ``window`` seconds are
counted and recorded as one row, "N connections from PEER refused in T s".

``DenialSink`` does the same for the sessions' own ``usb.denied`` rows (a device the rules
deny, a probe that failed, a session without a device): an owner plugging a blocked device
in and out, or reconnecting, wrote one row per attempt and grew the keystore without bound.
The first ``DENIAL_BURST`` denials of a (peer host, device, reason) in a window are recorded
at once (a person re-plugging a stick sees each), later ones within ``window`` seconds become
one row "N more denials of DEVICE from PEER in T s". Every other
row passes through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from usbgate.sources import AuditSink

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000
#: rows of one VM queued at once when one usbgate serves every VM of the host
MAX_QUEUED_PER_VM = 1_000
#: denials of one kind recorded one by one per window before the rest are counted
DENIAL_BURST = 5
REFUSAL_WINDOW = 10.0
# Distinct (action, peer, reason) kinds tracked at once; beyond, refusals count under peer "*".
MAX_REFUSAL_KINDS = 1024
#: rows ``record`` waits for room for rather than drop: what reached the guest and why it left
NEVER_DROPPED = frozenset({"usb.allowed", "usb.revoked", "usb.rules.unreadable"})

Row = tuple[str, str, dict[str, Any]]


class QueuedAuditSink:
    """An AuditSink whose rows a subclass writes (``_write``) on one worker thread, in order."""

    def __init__(self, *, max_queued: int = MAX_QUEUED, max_per_vm: int | None = None,
                 name: str = "usbgate-audit") -> None:  # fmt: skip
        """``max_per_vm``: rows of one VM queued at once (one usbgate serving many VMs: a VM
        flooding the queue cannot have another VM's rows dropped); default ``max_queued``."""
        self._queue: queue.Queue[Row | None] = queue.Queue(maxsize=max_queued)
        self._max_per_vm = max_per_vm or max_queued
        self._lock = threading.Lock()
        self._queued: dict[str, int] = {}  # by VM
        self._dropped: dict[str, int] = {}  # by VM
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def record(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        with self._lock:
            over = self._queued.get(vm, 0) >= self._max_per_vm and action not in NEVER_DROPPED
            if over:
                self._dropped[vm] = self._dropped.get(vm, 0) + 1
                return
            self._queued[vm] = self._queued.get(vm, 0) + 1
        if action in NEVER_DROPPED:
            self._queue.put((action, vm, detail))
            return
        try:
            self._queue.put_nowait((action, vm, detail))
        except queue.Full:
            with self._lock:
                self._unqueued(vm)
                self._dropped[vm] = self._dropped.get(vm, 0) + 1

    def _unqueued(self, vm: str) -> None:
        """One row of ``vm`` left the queue (under the lock)."""
        left = self._queued.get(vm, 0) - 1
        if left > 0:
            self._queued[vm] = left
        else:
            self._queued.pop(vm, None)

    def _write(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Called on the worker thread once the last row is written."""

    def _write_logged(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        try:
            self._write(action, vm, detail)
        except Exception as exc:  # the worker must outlive a bad row or a store hiccup
            log.error("audit %s for %s not written: %s", action, vm, exc)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            with self._lock:
                self._unqueued(item[1])
            self._write_logged(*item)
            with self._lock:
                dropped, self._dropped = self._dropped, {}
            for vm, count in dropped.items():
                self._write_logged("usb.audit.dropped", vm, {"count": count,
                                   "reason": "audit queue full: rows not recorded"})  # fmt: skip
        self._finish()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    async def aclose(self) -> None:
        with contextlib.suppress(RuntimeError):
            await asyncio.to_thread(self.close)


class Refusals:
    """Aggregates refused connections per (action, peer, reason) into bounded audit rows."""

    def __init__(self, audit: AuditSink, vm: str, *, window: float = REFUSAL_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.audit, self.vm, self.window, self.clock = audit, vm, window, clock
        self._open: dict[tuple[str, str, str], list[Any]] = {}  # key -> [start, count, detail]

    def refused(self, action: str, peer: str, reason: str, **detail: Any) -> None:
        """One refused connection from ``peer`` (a host, not host:port)."""
        now = self.clock()
        self.flush()
        key = (action, peer, reason)
        if key not in self._open and len(self._open) >= MAX_REFUSAL_KINDS:
            key = (action, "*", "refused (too many kinds to tell apart)")
        entry = self._open.get(key)
        if entry is None:
            self._open[key] = [now, 0, detail]
            self.audit.record(action, self.vm, {"peer": key[1], "reason": key[2], **detail})
        else:
            entry[1] += 1

    def flush(self, *, everything: bool = False) -> None:
        """Record the count of every window that has ended (all of them with ``everything``)."""
        now = self.clock()
        for key, (start, count, detail) in list(self._open.items()):
            if not everything and now - start < self.window:
                continue
            del self._open[key]
            if count:
                action, peer, reason = key
                seconds = round(now - start, 1)
                self.audit.record(action, self.vm, {
                    "peer": peer, "reason": reason, **detail, "count": count,
                    "seconds": seconds,
                    "summary": f"{count} connections from {peer} refused in {seconds:g} s",
                })  # fmt: skip


class DenialSink:
    """The AuditSink sessions write to: ``usb.denied`` aggregated, everything else passed on."""

    def __init__(self, audit: AuditSink, *, window: float = REFUSAL_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.audit, self.window, self.clock = audit, window, clock
        #: key -> [window start, rows recorded, denials counted, detail]
        self._open: dict[tuple[str, str, str, str], list[Any]] = {}

    def record(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        if action != "usb.denied":
            self.audit.record(action, vm, detail)
            return
        now = self.clock()
        self.flush()
        peer = str(detail.get("peer", ""))
        host = peer.rpartition(":")[0] or peer  # a reconnect changes the port, not the peer
        device = json.dumps(detail.get("device"), sort_keys=True, default=str)
        key = (vm, host, device, str(detail.get("reason", "")))
        if key not in self._open and len(self._open) >= MAX_REFUSAL_KINDS:
            key = (vm, "*", "*", "denied (too many kinds to tell apart)")
        entry = self._open.setdefault(key, [now, 0, 0, detail])
        if entry[1] < DENIAL_BURST:
            entry[1] += 1
            self.audit.record(action, vm, detail)
        else:
            entry[2] += 1

    def flush(self, *, everything: bool = False) -> None:
        """Record the count of every window that has ended (all of them with ``everything``)."""
        now = self.clock()
        for key, (start, _, count, detail) in list(self._open.items()):
            if not everything and now - start < self.window:
                continue
            del self._open[key]
            if count:
                vm, host, _, reason = key
                seconds = round(now - start, 1)
                dev = detail.get("device")
                what = dev.get("vid_pid", "a device") if isinstance(dev, dict) else "a device"
                self.audit.record("usb.denied", vm, {
                    **detail, "peer": host, "reason": reason, "count": count,
                    "seconds": seconds,
                    "summary": f"{count} more denials of {what} from {host} in {seconds:g} s",
                })  # fmt: skip

    async def aclose(self) -> None:
        self.flush(everything=True)
        await self.audit.aclose()
