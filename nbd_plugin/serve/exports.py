"""The host disk server's exports: many unlocked disks in one process, added and removed live.

One nbdkit (``plugin.py control=SOCK``) serves every disk of the host as an NBD export named
after the disk. This module is its state, without nbdkit and without sockets:

- `Exports.handle(request)` runs one control request (``serve/control.py``) and returns its
  response: ``add`` unlocks the image (the KDF runs here, in the calling thread) and claims it
  as a per-disk server does; ``remove`` refuses while a client is connected unless forced;
- `Exports.open(name, peer)` is nbdkit's ``open()``: an unknown name, or an export bound to
  another VM than the peer's (``serve/peers.py``), is refused with one log line and an event
  the keystore side reads (``events``) and audits;
- a `Connection` is the handle nbdkit passes back to every data callback: it checks its export
  is still served (and its lease, if it has a fence), counts bytes and forwards to the disk.

Every export keeps its own `EncryptedDisk` (range locks, scratch buffers, sticky write-back
error), so an EIO or a bad request on one never touches another. A forced remove stops new
requests at once (EIO); the image is closed when its last connection goes, never under a
request in flight.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import importlib.metadata
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from nbd_plugin.errors import ImageBusy, InvalidPassphrase, VmshieldError
from nbd_plugin.serve.connlog import stamp
from nbd_plugin.serve.control import (
    NAME_PATTERN,
    Add,
    Bind,
    Code,
    Event,
    Events,
    ExportInfo,
    Failure,
    List,
    Ok,
    Ping,
    Remove,
    Request,
    Response,
)
from nbd_plugin.serve.disk import Channel, EncryptedDisk, open_disk
from nbd_plugin.serve.fence import Fence
from nbd_plugin.serve.peers import Binding, Peer, PeerRefused

#: events kept for ``events`` (the keystore side polls; older ones are dropped)
MAX_EVENTS = 1000


def _version() -> str:
    try:
        return importlib.metadata.version("vmshield")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def stderr_line(line: str) -> None:
    """One line in nbdkit's log; a closed log never fails a request."""
    with contextlib.suppress(OSError):
        os.write(2, line.encode("utf-8", "replace") + b"\n")


class ExportRefused(VmshieldError):
    """nbdkit's open() of an export this client may not have (unknown, or another VM's)."""


@dataclass
class Export:
    """One served disk and its counters (updated by every connection's requests)."""

    name: str
    image: str
    readonly: bool
    bind: Bind | None
    since: float
    disk: EncryptedDisk
    fence: Fence | None = None
    removed: bool = False
    clients: dict[int, int] = field(default_factory=dict)  #: connection id -> peer pid
    bytes_read: int = 0
    bytes_written: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def info(self) -> ExportInfo:
        with self.lock:
            clients = tuple(self.clients.values())
            done = (self.bytes_read, self.bytes_written)
        return ExportInfo(
            self.name, self.image, self.readonly, self.bind, self.since, clients, *done
        )

    def close(self) -> None:
        self.disk.close()
        if self.fence is not None:
            os.close(self.fence.fd)


class Connection:
    """nbdkit's handle for one client of one export: the data callbacks go through here."""

    __slots__ = ("_channel", "_disk", "_export", "can_trim", "id", "pid", "sector", "size",
                 "volume")  # fmt: skip

    def __init__(self, export: Export, conn_id: int, pid: int, channel: Channel) -> None:
        self._export = export
        self._disk = export.disk
        self._channel = channel  # reads and writes: this connection's own
        self.id = conn_id
        self.pid = pid
        self.size = export.disk.size
        self.sector = export.disk.sector
        self.volume = export.disk.volume
        self.can_trim = export.disk.can_trim

    @property
    def export(self) -> Export:
        return self._export

    def _check(self) -> None:
        e = self._export
        if e.removed:
            raise OSError(errno.EIO, f"export {e.name} was removed")
        if e.fence is not None:
            e.fence.check()  # Fenced: the caller reports EIO

    def _count(self, read: int = 0, written: int = 0) -> None:
        e = self._export
        with e.lock:
            e.bytes_read += read
            e.bytes_written += written

    def pread(self, buf: Any, offset: int) -> None:
        self._check()
        self._channel.pread(buf, offset)
        self._count(read=len(buf))

    def pwrite(self, buf: Any, offset: int, *, fua: bool = False) -> None:
        self._check()
        self._channel.pwrite(buf, offset, fua=fua)
        self._count(written=len(buf))

    def flush(self) -> None:
        self._check()
        self._disk.flush()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check()
        self._disk.trim(offset, length, fua=fua)

    def zero(self, offset: int, length: int, **flags: bool) -> None:
        self._check()
        self._disk.zero(offset, length, **flags)
        self._count(written=length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check()
        return self._disk.extents(offset, length)


class Exports:
    """Every export of the host server (thread-safe: control and nbdkit threads use it)."""

    def __init__(
        self,
        *,
        readonly: bool = False,
        log: Callable[[str], None] = stderr_line,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.readonly = readonly  #: nbdkit -r: every export is read-only
        self._log = log
        self._clock = clock
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}
        self._adding: set[str] = set()
        self._events: collections.deque[Event] = collections.deque(maxlen=MAX_EVENTS)
        self._seq = 0
        self._conns = 0
        self.started = clock()

    def now(self) -> float:
        return self._clock()

    # ---- control requests ----------------------------------------------------------------
    def handle(self, request: Request, fence_fd: int | None = None) -> Response:
        """Run one control request; never raises for a request's own failure."""
        if isinstance(request, Add):
            try:
                return self.add(request, fence_fd)
            finally:
                request.wipe()
        if fence_fd is not None:
            os.close(fence_fd)
        if isinstance(request, Remove):
            return self.remove(request.name, force=request.force)
        if isinstance(request, List):
            return Ok({"exports": [e.info().to_json() for e in self.snapshot()]})
        if isinstance(request, Ping):
            uptime = round(self._clock() - self.started, 3)
            return Ok({"pid": os.getpid(), "version": _version(), "uptime": uptime})
        if isinstance(request, Events):
            events, last = self.events(request.after)
            return Ok({"events": [e.to_json() for e in events], "last": last})
        raise TypeError(f"not a request: {type(request).__name__}")

    def add(self, req: Add, fence_fd: int | None = None) -> Response:
        """Unlock and serve ``req.image`` as ``req.name`` (the KDF runs in this thread)."""
        readonly = req.readonly or self.readonly
        started = time.monotonic()
        fence: Fence | None = None
        with self._lock:
            if req.name in self._exports or req.name in self._adding:
                if fence_fd is not None:
                    os.close(fence_fd)
                return Failure(Code.EXISTS, f"export {req.name} is already served")
            same = [e.name for e in self._exports.values() if _same_file(e.image, req.image)]
            if same and not (readonly and all(self._exports[n].readonly for n in same)):
                if fence_fd is not None:
                    os.close(fence_fd)
                return Failure(Code.BUSY, f"{req.image} is already served as export {same[0]}")
            self._adding.add(req.name)
        try:
            if fence_fd is not None:
                try:
                    fence = Fence(fence_fd)
                except ValueError as exc:
                    os.close(fence_fd)
                    return Failure(Code.INVALID, f"add {req.name}: {exc}")
            try:
                disk = self._open(req, readonly)
            except InvalidPassphrase as exc:
                return self._add_failed(req, Code.BAD_PASSPHRASE, f"{req.image}: {exc}", fence)
            except ImageBusy as exc:
                return self._add_failed(req, Code.BUSY, str(exc), fence)
            except VmshieldError as exc:
                return self._add_failed(req, Code.IO, str(exc), fence)
            except OSError as exc:
                msg = f"{req.image}: {exc.strerror or exc}"
                return self._add_failed(req, Code.IO, msg, fence)
            export = Export(req.name, req.image, readonly, req.bind, self._clock(), disk, fence)
            with self._lock:
                self._exports[req.name] = export
            mode = "read-only" if readonly else "read-write"
            bound = f", bound to VM {req.bind.uuid}" if req.bind else ", unbound"
            took = (time.monotonic() - started) * 1000
            self._log(f"{stamp(self._clock())} vmshield: export {req.name} added: {req.image} "
                      f"({mode}{bound}) in {took:.0f} ms")  # fmt: skip
            return Ok({"export": export.info().to_json()})
        finally:
            with self._lock:
                self._adding.discard(req.name)

    def _open(self, req: Add, readonly: bool) -> EncryptedDisk:
        return open_disk(
            req.image, bytes(req.passphrase), readonly=readonly, keyslot=req.keyslot,
            discard=req.discard,
        )  # fmt: skip

    def _add_failed(self, req: Add, code: Code, msg: str, fence: Fence | None) -> Failure:
        if fence is not None:
            os.close(fence.fd)
        self._log(f"{stamp(self._clock())} vmshield: export {req.name} not added: {msg}")
        return Failure(code, msg)

    def remove(self, name: str, *, force: bool = False) -> Response:
        with self._lock:
            export = self._exports.get(name)
            if export is None:
                return Failure(Code.NOT_FOUND, f"no export {name}")
            with export.lock:
                clients = sorted(export.clients.values())
                if clients and not force:
                    pids = ", ".join(str(p) for p in clients)
                    return Failure(
                        Code.BUSY,
                        f"export {name} has {len(clients)} client(s) connected (pid {pids}): "
                        "shut the VM down first, or force",
                    )
                export.removed = True
                close_now = not export.clients
            del self._exports[name]
        if close_now:
            export.close()
        forced = f"; {len(clients)} client(s) get EIO from now on" if clients else ""
        self._log(f"{stamp(self._clock())} vmshield: export {name} removed{forced}")
        return Ok({"removed": name, "clients": clients})

    def snapshot(self) -> list[Export]:
        with self._lock:
            return sorted(self._exports.values(), key=lambda e: e.name)

    def names(self, peer: Peer | None = None) -> list[str]:
        """Export names; with ``peer``, only those it may open (NBD_OPT_LIST tells a client
        nothing about other VMs' disks)."""
        return [e.name for e in self.snapshot() if peer is None or _may_open(e, peer)]

    def events(self, after: int) -> tuple[list[Event], int]:
        with self._lock:
            return [e for e in self._events if e.seq > after], self._seq

    def _event(self, kind: str, export: str, pid: int, reason: str) -> None:
        with self._lock:
            self._seq += 1
            self._events.append(Event(self._seq, self._clock(), kind, export, pid, reason))

    # ---- nbdkit's open() and close() ---------------------------------------------------------
    def open(self, name: str, peer: Peer) -> Connection:
        """The handle of a new client of export ``name``, or ExportRefused (logged, and an
        event for the keystore's audit)."""
        shown = name if NAME_PATTERN.fullmatch(name) else ascii(name[:80])
        with self._lock:
            export = self._exports.get(name)
        if export is None:
            self._refuse(shown, peer, f"{peer.describe()} asked for {shown}: no such export")
        if export.bind is not None:
            try:
                Binding(export.bind.uuid, export.bind.domain).check(peer)
            except PeerRefused as exc:
                self._refuse(name, peer, str(exc))
        channel = export.disk.channel()  # made before the locks: other clients' requests wait
        with self._lock, export.lock:  # on export.lock
            if not export.removed:
                self._conns += 1
                conn = Connection(export, self._conns, peer.pid, channel)
                export.clients[conn.id] = peer.pid
                count = len(export.clients)
        if export.removed:  # removed between the lookup and now
            self._refuse(name, peer, f"{peer.describe()} asked for {name}: it was just removed")
        self._log(f"{stamp(self._clock())} vmshield: export {name}: client #{conn.id} "
                  f"{peer.describe()} connected; {count} open")  # fmt: skip
        return conn

    def _refuse(self, export: str, peer: Peer, reason: str) -> NoReturn:
        self._log(f"{stamp(self._clock())} vmshield: export {export}: refused a client: {reason}")
        self._event("refused", export, peer.pid, reason)
        raise ExportRefused(reason)

    def close(self, conn: Connection) -> None:
        export = conn.export
        with export.lock:
            export.clients.pop(conn.id, None)
            count = len(export.clients)
            last_of_removed = export.removed and not export.clients
        self._log(f"{stamp(self._clock())} vmshield: export {export.name}: client #{conn.id} "
                  f"disconnected; {count} open")  # fmt: skip
        if last_of_removed:
            export.close()

    def close_all(self) -> None:
        """nbdkit's cleanup: every export closes (no client is left)."""
        with self._lock:
            exports = list(self._exports.values())
            self._exports.clear()
        for e in exports:
            e.removed = True
            e.close()


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _may_open(export: Export, peer: Peer) -> bool:
    if export.bind is None:
        return True
    try:
        Binding(export.bind.uuid, export.bind.domain).check(peer)
    except PeerRefused:
        return False
    return True


__all__ = ["Connection", "Export", "ExportRefused", "Exports", "stderr_line"]
