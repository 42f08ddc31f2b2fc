"""The cluster-wide lease of a served disk, held by a small process that lives as long as nbdkit.

`disk serve` on a PostgreSQL keystore starts `python -m keystore.services.lease` before
nbdkit. That process connects, takes the disk's lease (keystore.postgres.lease: a session
advisory lock) and answers `ok` or `held by ...` on its stdout; once nbdkit runs it is told
nbdkit's pid and stays, holding the connection, until nbdkit exits (then releases the lease)
or the connection is lost (then it fences: SIGTERM to nbdkit, since another host may take the
lease at once). A crashed host loses its connection, so its lease ends without clean-up.
Read-only serves take the lease shared. On an SQLite keystore there is no lease: the image's
flock covers the one host.
"""

from __future__ import annotations

import contextlib
import os
import socket as socketmod
import subprocess
import sys
from pathlib import Path

from keystore import paths
from keystore.backends import Location
from keystore.errors import KeystoreError
from keystore.models import Disk
from keystore.postgres.lease import LeaseHeld
from keystore.postgres.url import PgUrl

APPLICATION = "vmshield-lease"
_POLL = 0.2


class Lease:
    """The parent's handle on a running lease holder."""

    def __init__(self, proc: subprocess.Popen[bytes], holder: str) -> None:
        self.proc = proc
        self.holder = holder

    def attach(self, pid: int) -> None:
        """nbdkit runs as `pid`: the holder watches it from now on."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{pid}\n".encode())
        self.proc.stdin.close()

    def abort(self) -> None:
        """nbdkit did not start: the holder releases the lease and exits."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def holder_name(socket: Path) -> str:
    return f"host {socketmod.gethostname()} pid {os.getpid()} socket {socket}"


def take(
    location: Location, disk: Disk, socket: Path, *, readonly: bool, timeout: float = 30
) -> Lease | None:
    """Take the disk's lease before starting nbdkit (None on SQLite). LeaseHeld if taken."""
    if not isinstance(location, PgUrl):
        return None
    holder = holder_name(socket)
    paths.private_dir(socket.parent)  # before any file in it: no one else's, no planted link
    logfile = socket.with_suffix(".lease.log")
    logfile.unlink(missing_ok=True)
    log = os.open(logfile, paths.NEW_FILE, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keystore.services.lease", location, str(disk.id),
             disk.name, holder, str(socket), "ro" if readonly else "rw"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
        )  # fmt: skip
    finally:
        os.close(log)
    assert proc.stdout is not None
    answer = proc.stdout.readline().decode(errors="replace").strip()
    proc.stdout.close()
    if answer == "ok":
        return Lease(proc, holder)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    if answer.startswith("held "):
        raise LeaseHeld(answer.removeprefix("held "))
    raise KeystoreError(f"cannot take the lease of disk {disk.name}: {answer or 'no answer'}")


# -- the holder process -------------------------------------------------------------------


def _hold(url: str, disk_id: int, disk: str, holder: str, sock: Path, readonly: bool) -> int:
    import psycopg

    from keystore.postgres import connection as pgconn
    from keystore.postgres import lease as pglease
    from keystore.services import serve

    try:
        conn = pgconn.connect_sync(url, application_name=APPLICATION)
        pglease.try_take(conn, disk_id, disk, holder, readonly=readonly)
    except LeaseHeld as e:
        print(f"held {e}", flush=True)
        return 3
    except (KeystoreError, psycopg.Error) as e:
        print(f"error {str(e).strip().splitlines()[0] if str(e).strip() else e!r}", flush=True)
        return 1
    print("ok", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the parent stops reading now
    line = sys.stdin.readline()
    if not line.strip():
        pglease.release(conn, disk_id)
        return 0
    pid = int(line)
    files = serve.ServerFiles(sock)
    try:
        while serve.is_our_server(pid, sock):
            # returns at once if the server ends our session: no polling delay to fence
            for _ in conn.notifies(timeout=_POLL, stop_after=1):
                pass
        pglease.release(conn, disk_id)
        return 0
    except psycopg.Error as e:
        print(f"lease of {disk} lost ({e}); stopping nbdkit pid {pid}", file=sys.stderr)
        serve.stop(pid, files)
        return 2
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    url, disk_id, disk, holder, sock, mode = argv
    return _hold(url, int(disk_id), disk, holder, Path(sock), mode == "ro")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
