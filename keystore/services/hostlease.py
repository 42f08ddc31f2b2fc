"""The host disk server's lease holder (issue 22): one PostgreSQL session for every export.

On a PostgreSQL keystore every disk served read-write holds a cluster-wide lease
(keystore.postgres.lease: a session advisory lock). A per-disk server (`--isolated`) keeps
its own holder process (keystore.services.lease). The exports of a host disk server share
ONE holder, `python -m keystore.services.hostlease RUN_DIR URL`, started on demand by the
first `disk serve` of the run directory and gone once it has held nothing for IDLE s. It
keeps one session (application_name `vmshield-host-lease`) and in it one advisory lock per
served export, and for each export the write end of a fence pipe whose read end went to the
host server with the export's add (nbd_plugin/serve/fence.py).

It is driven over RUN/nbd-lease.sock, one JSON line each way (nbd_plugin/osutil/jsonctl.py),
used only by root or its own user (SO_PEERCRED):

    {"op": "take", "export", "disk_id", "disk", "readonly", "holder", "keystore"} + pipe's
        write end (SCM_RIGHTS)  -> {"ok": true} | {"ok": false, "held"|"error": "..."}
    {"op": "attach", "export", "pid"}   the add succeeded; the server `pid` serves it
    {"op": "release", "export"}         the export was removed (or its add failed)
    {"op": "list"}                      -> {"ok": true, "leases": [...]}

Fencing, as for a per-disk holder, but per export:
- an export removed from the server (`disk stop`, or the server gone) releases its lock;
- a lock that is no longer held while the session lives fences its own export only;
- the session lost (the server ended it, `pg_terminate_backend`, a partitioned host: no
  answer for DEADLINE s) or the holder killed (SIGKILL, OOM: the kernel closes every write
  end) fences EVERY export of the host at once: that is the price of one session instead
  of one per disk. The holder then removes the exports it can and exits; the next
  `disk serve` starts a new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from keystore import paths
from keystore.errors import KeystoreError
from keystore.location import Location
from keystore.models import Disk
from keystore.postgres.lease import LeaseHeld
from keystore.services import hostdisk, nbdproc
from keystore.services.lease import DEADLINE, GRACE, PING, SERVER_KEEPALIVE, FenceEnd
from keystore.services.nbdproc import HostFiles
from nbd_plugin.errors import VmshieldError
from nbd_plugin.osutil import jsonctl

APPLICATION = "vmshield-host-lease"
#: the holder exits after holding no lease for IDLE s
IDLE = 10.0
#: the server's exports are compared with the leases every CHECK s
CHECK = 1.0
_UCRED = struct.Struct("3i")
_MAX_LINE = 1 << 16


def control_path(host: HostFiles) -> Path:
    return host.run_dir / "nbd-lease.sock"


def log_path(host: HostFiles) -> Path:
    return host.run_dir / "nbd-lease.log"


def _keystore_id(location: Location) -> str:
    """Names the keystore without putting its URL on the socket."""
    return hashlib.sha256(str(location).encode()).hexdigest()[:16]


def holder_name(host: HostFiles, export: str, pid: int) -> str:
    return f"host {socket.gethostname()} pid {pid} socket {host.socket} export {export}"


# -- the client side ------------------------------------------------------------------------


class HostLease(FenceEnd):
    """A disk's lease taken by the host's holder (serve.serve_recorded's handle, as lease.Lease)."""

    def __init__(self, host: HostFiles, export: str, fence_fd: int) -> None:
        super().__init__(fence_fd)  # the read end of this export's pipe, for the server
        self.host = host
        self.export = export

    def attach(self, pid: int) -> None:
        """The export is served by the host server `pid` (which has its own copy of the fence)."""
        self._close_fence()
        with contextlib.suppress(KeystoreError):  # its sweep sees the export anyway
            _call(self.host, {"op": "attach", "export": self.export, "pid": pid})

    def abort(self) -> None:
        """The add failed: the lock is released."""
        self._close_fence()
        release(self.host, self.export)


def _call(host: HostFiles, msg: dict[str, Any], fds: tuple[int, ...] = (),
          timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
    try:
        reply = jsonctl.request(control_path(host), msg, timeout=timeout, fds=fds)
    except jsonctl.ControlError as e:
        raise Unreachable(str(e)) from None
    if reply.get("ok") is True:
        return reply
    if isinstance(reply.get("held"), str):
        raise LeaseHeld(reply["held"])
    raise KeystoreError(f"the host lease holder: {reply.get('error') or 'no answer'}")


class Unreachable(KeystoreError):
    """No holder answers on the run directory's lease socket."""


def release(host: HostFiles, export: str) -> bool:
    """Release `export`'s lock now (else the holder's sweep does within CHECK s); False if
    no holder answers or it held none."""
    try:
        return bool(_call(host, {"op": "release", "export": export}).get("released"))
    except KeystoreError:
        return False


def leases(host: HostFiles) -> list[dict[str, Any]] | None:
    """What the host's holder holds; None if none answers."""
    try:
        found = _call(host, {"op": "list"}, timeout=10).get("leases")
    except KeystoreError:
        return None
    return found if isinstance(found, list) else None


def take(
    location: Location, disk: Disk, host: HostFiles, export: str, *, readonly: bool,
    timeout: float = 30.0,
) -> HostLease:  # fmt: skip
    """Take `disk`'s lease for `export` in the host's holder (started if none answers);
    LeaseHeld naming the holder if another host (or server) has it."""
    fence_r, fence_w = os.pipe()
    try:
        msg = {"op": "take", "export": export, "disk_id": disk.id, "disk": disk.name,
               "readonly": readonly, "keystore": _keystore_id(location)}  # fmt: skip
        for attempt in range(3):
            try:
                _call(host, msg, (fence_w,), timeout)
                break
            except Unreachable:
                if attempt == 2:
                    raise
                _ensure(location, host, timeout)
    except BaseException:
        os.close(fence_r)
        raise
    finally:
        os.close(fence_w)  # only the holder keeps the write end
    return HostLease(host, export, fence_r)


def _ensure(location: Location, host: HostFiles, timeout: float) -> None:
    """Start the run directory's holder unless one answers (two commands take turns)."""
    paths.private_dir(host.run_dir)
    fd = os.open(host.run_dir / "nbd-lease.start.lock",
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if leases(host) is not None:
            return
        log = os.open(log_path(host),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)  # fmt: skip
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "keystore.services.hostlease", str(host.run_dir),
                 str(location)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(log)
        assert proc.stdout is not None
        answer = proc.stdout.readline().decode(errors="replace").strip()
        proc.stdout.close()
        if answer != "ok":
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
            raise KeystoreError(
                f"cannot start the host lease holder: {answer or 'no answer'} "
                f"(see {log_path(host)})"
            )
    finally:
        os.close(fd)


# -- the holder process ---------------------------------------------------------------------


@dataclasses.dataclass
class _Entry:
    export: str
    disk_id: int
    disk: str
    readonly: bool
    fence: int  # the write end; -1 once fenced
    client: int  # the pid that took it, until attached
    server: int | None = None  # the host server's pid, once attached


class _Holder:
    def __init__(self, host: HostFiles, url: str, conn: Any) -> None:
        self.host = host
        self.keystore = hashlib.sha256(url.encode()).hexdigest()[:16]
        self.conn = conn
        self.entries: dict[str, _Entry] = {}
        self.lock = threading.Lock()  # entries' fences, against the deadline thread
        self.answered = time.monotonic()
        self.idle_since = time.monotonic()
        self.checked = 0.0

    def say(self, text: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: {text}",
              file=sys.stderr, flush=True)  # fmt: skip

    # the lock and the fence of one export
    def _fence(self, e: _Entry) -> bool:
        with self.lock:
            if e.fence < 0:
                return False
            os.close(e.fence)
            e.fence = -1
            return True

    def _drop(self, e: _Entry, why: str) -> None:
        from keystore.postgres import lease as pglease

        self._fence(e)
        self.entries.pop(e.export, None)
        pglease.release(self.conn, e.disk_id)
        self.say(f"released the lease of {e.disk} (export {e.export}): {why}")

    def fence_all(self, why: str) -> None:
        """The session is gone: every export refuses I/O at once, then is removed."""
        with self.lock:
            entries = list(self.entries.values())
            for e in entries:
                if e.fence >= 0:
                    os.close(e.fence)
                    e.fence = -1
        for e in entries:
            self.say(f"{why}; fenced export {e.export}")
            if e.server is not None and nbdproc.is_host_server(e.server, self.host):
                with contextlib.suppress(KeystoreError, OSError, VmshieldError):
                    hostdisk.remove(self.host, e.export, force=True)
                    self.say(f"removed export {e.export} of pid {e.server}")

    # requests
    def handle(self, msg: dict[str, Any], fds: list[int], peer: int) -> dict[str, Any]:
        op = msg.get("op")
        try:
            if op == "take":
                if len(fds) != 1:
                    return {"ok": False, "error": "take needs the fence pipe's write end"}
                fd = fds.pop()
                try:
                    return self.take(msg, fd, peer)
                except BaseException:
                    if fd not in [e.fence for e in self.entries.values()]:
                        os.close(fd)
                    raise
            export = msg.get("export")
            if op == "attach" and isinstance(export, str) and isinstance(msg.get("pid"), int):
                e = self.entries.get(export)
                if e is None:
                    return {"ok": False, "error": f"no lease for export {export}"}
                e.server = msg["pid"]
                return {"ok": True}
            if op == "release" and isinstance(export, str):
                e = self.entries.get(export)
                if e is not None:
                    self._drop(e, "released")
                return {"ok": True, "released": e is not None}
            if op == "list":
                return {"ok": True, "pid": os.getpid(), "leases": [
                    {"export": e.export, "disk": e.disk, "readonly": e.readonly,
                     "server": e.server, "fenced": e.fence < 0}
                    for e in self.entries.values()]}  # fmt: skip
            return {"ok": False, "error": f"unknown request {str(op)[:40]!r}"}
        finally:
            for fd in fds:
                os.close(fd)

    def take(self, msg: dict[str, Any], fd: int, peer: int) -> dict[str, Any]:
        from keystore.postgres import lease as pglease

        export, disk, disk_id = msg.get("export"), msg.get("disk"), msg.get("disk_id")
        if not (isinstance(export, str) and isinstance(disk, str) and isinstance(disk_id, int)):
            os.close(fd)
            return {"ok": False, "error": "take: export, disk and disk_id expected"}
        if msg.get("keystore") != self.keystore:
            os.close(fd)
            return {"ok": False, "error": f"it holds leases of another keystore (pid "
                    f"{os.getpid()}): one keystore per run directory"}  # fmt: skip
        self.sweep(force=True)  # a server restarted: its old exports' leases go first
        if export in self.entries or any(e.disk_id == disk_id for e in self.entries.values()):
            os.close(fd)  # advisory locks nest in a session: a second take would succeed
            return {"ok": False, "error": f"disk {disk} already has a lease on this host"}
        try:
            left_behind = pglease.try_take(
                self.conn, disk_id, disk, holder_name(self.host, export, os.getpid()),
                readonly=bool(msg.get("readonly")),
            )  # fmt: skip
        except LeaseHeld as e:
            os.close(fd)
            return {"ok": False, "held": str(e)}
        self.entries[export] = _Entry(export, disk_id, disk, bool(msg.get("readonly")), fd, peer)
        self.say(f"took the lease of {disk} (export {export})")
        if left_behind:  # the previous server may still be finishing a request
            time.sleep(GRACE)
        return {"ok": True}

    def sweep(self, *, force: bool = False) -> None:
        """Release the leases whose export is gone (or never came: its client died), fence
        those whose lock is no longer held."""
        now = time.monotonic()
        if not force and now - self.checked < CHECK:
            return
        self.checked = now
        held = self.locks()
        for e in list(self.entries.values()):
            if e.disk_id not in held and e.fence >= 0:
                self._fence(e)
                self.say(f"the lock of {e.disk} is no longer held; fenced export {e.export}")
        attached = [e for e in self.entries.values() if e.server is not None]
        found = hostdisk.exports(self.host) if attached else None
        for e in list(self.entries.values()):
            if e.server is None:
                if not Path(f"/proc/{e.client}").exists():
                    self._drop(e, f"pid {e.client} that took it is gone")
            elif not nbdproc.is_host_server(e.server, self.host):
                self._drop(e, f"the host server pid {e.server} is gone")
            elif found is not None and e.export not in found:
                self._drop(e, "the export was removed")
        if self.entries:
            self.idle_since = now

    def locks(self) -> set[int]:
        """The disks whose advisory lock this session holds (a query: proves it is alive)."""
        from keystore.postgres import lease as pglease

        rows = self.conn.execute(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 "
            "AND pid = pg_backend_pid() AND classid = %s AND granted",
            (pglease.LEASE_CLASS,),
        ).fetchall()
        self.answered = time.monotonic()
        return {int(r[0]) for r in rows}


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead holder's: the start lock keeps a live one's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def _serve_one(holder: _Holder, conn: socket.socket) -> None:
    conn.settimeout(5)
    pid, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid not in (0, os.geteuid()):
        holder.say(f"refused a request from uid {uid} pid {pid}")
        return
    data, fds = bytearray(), []
    while not data.endswith(b"\n") and len(data) < _MAX_LINE:
        chunk, got, _, _ = socket.recv_fds(conn, 65536, 4)
        fds += got
        if not chunk:
            break
        data += chunk
    try:
        msg = json.loads(bytes(data))
        if not isinstance(msg, dict):
            raise ValueError
    except ValueError:
        for fd in fds:
            os.close(fd)
        conn.sendall(b'{"ok": false, "error": "one JSON object per line expected"}\n')
        return
    reply = holder.handle(msg, fds, pid)
    conn.sendall(json.dumps(reply).encode() + b"\n")


def _hold(run_dir: Path, url: str) -> int:
    import psycopg

    from keystore.postgres import connection as pgconn

    host = HostFiles(run_dir)
    try:
        conn = pgconn.connect_sync(url, application_name=APPLICATION)
        for sql in SERVER_KEEPALIVE:
            conn.execute(sql)
        listener = _listen(control_path(host))
    except (KeystoreError, psycopg.Error, OSError) as e:
        print(f"error {str(e).strip().splitlines()[0] if str(e).strip() else e!r}", flush=True)
        return 1
    holder = _Holder(host, url, conn)
    holder.say(f"holding the leases of {host.socket}'s exports")
    print("ok", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(PING):
            if time.monotonic() - holder.answered > DEADLINE:
                holder.fence_all(f"no answer from the database for {DEADLINE:g} s")
                os._exit(2)

    threading.Thread(target=watchdog, name="lease-deadline", daemon=True).start()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listener")
    sel.register(conn.fileno(), selectors.EVENT_READ, "db")  # readable: the session ended
    try:
        while True:
            for key, _ in sel.select(PING):
                if key.data == "listener":
                    client, _ = listener.accept()
                    with client, contextlib.suppress(OSError):
                        _serve_one(holder, client)
            holder.locks()  # raises once the session is gone
            holder.sweep()
            if not holder.entries and time.monotonic() - holder.idle_since > IDLE:
                control_path(host).unlink(missing_ok=True)
                listener.close()
                holder.say("no lease held: exiting")
                return 0
    except psycopg.Error as e:
        holder.fence_all(f"the lease session was lost ({str(e).strip()[:200]})")
        return 2
    finally:
        done.set()
        with contextlib.suppress(OSError):
            if listener.fileno() >= 0:
                control_path(host).unlink(missing_ok=True)
        with contextlib.suppress(psycopg.Error):
            conn.close()


def main(argv: list[str]) -> int:
    run_dir, url = argv
    return _hold(Path(run_dir), url)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
