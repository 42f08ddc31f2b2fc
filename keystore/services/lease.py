"""The cluster-wide lease of a served disk, held by a small process that lives as long as nbdkit.

`disk serve` on a PostgreSQL keystore starts `python -m keystore.services.lease` before
nbdkit. That process connects, takes the disk's lease (keystore.postgres.lease: a session
advisory lock) and answers `ok` or `held by ...` on its stdout; once nbdkit runs it is told
nbdkit's pid and stays, holding the connection, until nbdkit exits (then releases the lease)
or the connection is lost (then it fences: SIGTERM to nbdkit, since another host may take the
lease at once). A crashed host loses its connection, so its lease ends without clean-up.
Read-only serves take the lease shared. On an SQLite keystore there is no lease: the image's
flock covers the one host.

nbdkit's I/O is tied to the holder (issue #20 B13): the holder keeps the write end of a pipe
whose read end nbdkit checks before every request (`fence=-FD`, nbd_plugin/serve/fence.py).
The holder closes it first when it fences, and the kernel closes it when the holder dies
(SIGKILL, OOM), so nbdkit refuses I/O and shuts down at its next request. The holder pings
its session every PING s and fences itself after DEADLINE s without an answer (a partitioned
host), while the server is told to end the session only after ~16 s of TCP silence (its
keepalives): the holder stops writing well before the lock can move. A taker that finds the
previous holder's row (it never released) waits GRACE s before serving: a request already
past the fence check may still complete on the old server. docs/keystore.md has the window.
"""

from __future__ import annotations

import contextlib
import os
import socket as socketmod
import subprocess
import sys
import threading
import time
from pathlib import Path

from keystore import paths
from keystore.errors import KeystoreError
from keystore.location import Location
from keystore.models import Disk
from keystore.postgres.lease import LeaseHeld
from keystore.services import nbdproc

APPLICATION = "vmshield-lease"
#: A taker waits this long (s) when the previous holder never released the lease.
GRACE = 1.0
#: The holder pings its session every PING s and fences after DEADLINE s without an answer.
PING = 0.2
DEADLINE = 5.0
#: The server ends a silent TCP session after 10 + 3 x 2 s: long after DEADLINE.
SERVER_KEEPALIVE = (
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 3",
)


class FenceEnd:
    """The read end of a lease's fence pipe, held until the server has its own copy."""

    def __init__(self, fence_fd: int) -> None:
        self.fence_fd = fence_fd

    def _close_fence(self) -> None:
        if self.fence_fd >= 0:
            os.close(self.fence_fd)
            self.fence_fd = -1


class Lease(FenceEnd):
    """The parent's handle on a running lease holder."""

    def __init__(self, proc: subprocess.Popen[bytes], holder: str, fence_fd: int) -> None:
        super().__init__(fence_fd)  # the read end of the holder's pipe, for nbdkit
        self.proc = proc
        self.holder = holder

    def attach(self, pid: int) -> None:
        """nbdkit runs as `pid` (with its own copy of the fence): the holder watches it."""
        self._close_fence()
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{pid}\n".encode())
        self.proc.stdin.close()

    def abort(self) -> None:
        """nbdkit did not start: the holder releases the lease and exits."""
        self._close_fence()
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def holder_name(socket: Path) -> str:
    return f"host {socketmod.gethostname()} pid {os.getpid()} socket {socket}"


def take(
    location: Location,
    disk: Disk,
    socket: Path,
    *,
    readonly: bool,
    timeout: float = 30,
) -> Lease | None:
    """Take the disk's lease before starting its own nbdkit (None on SQLite). LeaseHeld if
    taken. (The exports of a host server share one holder: keystore.services.hostlease.)"""
    if not location.shared:
        return None
    holder = holder_name(socket)
    paths.private_dir(socket.parent)  # before any file in it: no one else's, no planted link
    logfile = socket.with_suffix(".lease.log")
    logfile.unlink(missing_ok=True)
    log = os.open(logfile, paths.NEW_FILE, 0o600)
    fence_r, fence_w = os.pipe()  # only the holder keeps the write end
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keystore.services.lease", str(location), str(disk.id),
             disk.name, holder, str(socket), "ro" if readonly else "rw", str(fence_w)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            pass_fds=(fence_w,),
        )  # fmt: skip
    except BaseException:
        os.close(fence_r)
        raise
    finally:
        os.close(log)
        os.close(fence_w)
    assert proc.stdout is not None
    answer = proc.stdout.readline().decode(errors="replace").strip()
    proc.stdout.close()
    if answer == "ok":
        return Lease(proc, holder, fence_r)
    os.close(fence_r)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    if answer.startswith("held "):
        raise LeaseHeld(answer.removeprefix("held "))
    raise KeystoreError(f"cannot take the lease of disk {disk.name}: {answer or 'no answer'}")


# -- the holder process -------------------------------------------------------------------


class _Fence:
    """The holder's end of the fence: closed once, by whichever thread fences first."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def close(self) -> bool:
        with self._lock:
            if self.fd < 0:
                return False
            os.close(self.fd)
            self.fd = -1
            return True


def _hold(
    url: str,
    disk_id: int,
    disk: str,
    holder: str,
    sock: Path,
    readonly: bool,
    fence_fd: int,
) -> int:
    import psycopg

    from keystore.postgres import connection as pgconn
    from keystore.postgres import lease as pglease

    fence = _Fence(fence_fd)
    try:
        conn = pgconn.connect_sync(url, application_name=APPLICATION)
        for sql in SERVER_KEEPALIVE:
            conn.execute(sql)
        left_behind = pglease.try_take(conn, disk_id, disk, holder, readonly=readonly)
    except LeaseHeld as e:
        print(f"held {e}", flush=True)
        return 3
    except (KeystoreError, psycopg.Error) as e:
        print(f"error {str(e).strip().splitlines()[0] if str(e).strip() else e!r}", flush=True)
        return 1
    if left_behind:  # the previous server may still be finishing a request
        time.sleep(GRACE)
    print("ok", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the parent stops reading now
    line = sys.stdin.readline()
    if not line.strip():
        fence.close()
        pglease.release(conn, disk_id)
        return 0
    pid = int(line)
    files = nbdproc.ServerFiles(sock)

    def serving() -> bool:
        return nbdproc.is_our_server(pid, sock)

    def fence_off(why: str) -> None:
        if not fence.close():  # nbdkit refuses I/O from its next request on
            return
        print(f"{why}; stopping nbdkit pid {pid}", file=sys.stderr, flush=True)
        nbdproc.stop(pid, files)

    answered = [time.monotonic()]
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(PING):
            if time.monotonic() - answered[0] > DEADLINE:
                fence_off(f"lease of {disk}: no answer from the database for {DEADLINE:g} s")
                os._exit(2)

    threading.Thread(target=watchdog, name="lease-deadline", daemon=True).start()
    try:
        while serving():
            # returns at once if the server ends our session: no polling delay to fence
            for _ in conn.notifies(timeout=PING, stop_after=1):
                pass
            conn.execute("SELECT 1")
            answered[0] = time.monotonic()
        done.set()
        fence.close()
        pglease.release(conn, disk_id)
        return 0
    except psycopg.Error as e:
        done.set()
        fence_off(f"lease of {disk} lost ({e})")
        return 2
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    url, disk_id, disk, holder, sock, mode, fence_fd = argv
    return _hold(url, int(disk_id), disk, holder, Path(sock), mode == "ro", int(fence_fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
