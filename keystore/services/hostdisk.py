"""The host disk server, keystore side (issue 22): one nbdkit serving every disk of the host.

The server (nbd_plugin/serve/hostserver.py) serves each disk as an NBD export named after the
disk on RUN/nbd.sock; exports are added and removed at run time over RUN/nbd-control.sock
(nbd_plugin/serve/hostclient.py), the passphrase goes over that socket and the KDF runs in
the server. This module:

- starts the server on demand (`ensure`): `systemctl start vmshield-nbd.service` when systemd
  runs and the run directory is the system's, else a transient nbdkit (nbdproc.start_host);
- adds and removes exports (`add`, `remove`), lists them (`exports`);
- turns the server's refusals (a client asking for an export that is not its VM's) into
  audit rows (`audit_events`): the server keeps them in an event log, the keystore side
  collects them whenever it talks to the server.

The keystore records a host export like a per-disk server (the `servers` table) with the host
server's pid and, as its socket, the export's NBD URI (nbdproc.Endpoint). The workflows
(check, authenticate, record, audit) are keystore.services.serve's, for both kinds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from pathlib import Path

from keystore import paths
from keystore.errors import Conflict
from keystore.repository import Repository
from keystore.services import nbdproc, usage
from keystore.services.nbdproc import HostFiles, ServeError
from keystore.services.store import Keystore
from nbd_plugin.serve import control
from nbd_plugin.serve.control import Add, Events, ExportInfo, List, Ping, Remove
from nbd_plugin.serve.hostclient import HostClient, HostServerError, HostUnavailable
from nbd_plugin.serve.peers import Binding

UNIT = "vmshield-nbd.service"
#: the actor of the audit rows made from the server's own events
SERVER_ACTOR = "host-disk-server"

__all__ = [
    "UNIT",
    "HostFiles",
    "HostServerError",
    "HostUnavailable",
    "add",
    "audit_events",
    "ensure",
    "export_name",
    "exports",
    "ping",
    "remove",
]


def export_name(disk: str) -> str:
    """The export of disk `disk` (its name), or Conflict if the name cannot be one."""
    if not control.NAME_PATTERN.fullmatch(disk):
        raise Conflict(
            f"disk name {disk!r} cannot be an NBD export name (1-64 of A-Z a-z 0-9 . _ -): "
            "serve it with --isolated"
        )
    return disk


def ping(files: HostFiles, *, timeout: float = 5.0) -> int | None:
    """The pid of the host server answering on `files.control`, or None."""
    try:
        with HostClient(str(files.control), timeout=timeout) as c:
            pid = c.call(Ping()).body.get("pid")
    except (HostUnavailable, HostServerError):
        return None
    return pid if isinstance(pid, int) and nbdproc.is_host_server(pid, files) else None


def _systemd_runs() -> bool:
    return Path("/run/systemd/system").is_dir()


def _inside_unit() -> bool:
    """Does this process run in the unit's cgroup (its ExecStartPost)?"""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return False
    return any(line.rstrip().endswith(f"/{UNIT}") for line in text.splitlines())


def _unit_started(files: HostFiles, timeout: float) -> bool:
    """`systemctl start` the unit, for the system's run directory when systemd runs; False
    if that is not the case or the unit is not installed (a checkout: start nbdkit here)."""
    if files.run_dir != paths.SYSTEM_RUN_DIR or not _systemd_runs() or os.geteuid() != 0:
        return False
    proc = subprocess.run(["systemctl", "start", UNIT], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    if proc.returncode == 0:
        return True
    said = (proc.stderr.strip().splitlines() or ["no output"])[0]
    if "not found" in said or "not loaded" in said:
        return False
    raise ServeError(f"systemctl start {UNIT} failed: {said} (`journalctl -u {UNIT}`)")


def _wait(files: HostFiles, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        pid = ping(files)
        if pid is not None and nbdproc.probe(files.socket):
            return pid
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def ensure(files: HostFiles, *, timeout: float = 60.0) -> tuple[int, bool]:
    """(pid, started): the host server on `files`, started if none answers.

    Under systemd, for the system's run directory, the unit starts it (its ExecStartPost
    restores the exports); otherwise a transient nbdkit, kept out of swap by the plugin's
    mlockall. Two commands starting it at once take turns (a lock file in the run
    directory): the second finds the first's, and never clears its files while it starts."""
    pid = ping(files)
    if pid is not None:
        return pid, False
    paths.private_dir(files.run_dir)
    fd = os.open(files.run_dir / "nbd.start.lock",
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pid = ping(files)
        if pid is not None:
            return pid, False
        # the unit's own ExecStartPost (`disk serve --restore`) waits for the server it
        # belongs to: a `systemctl start` from there would wait for itself
        if not _inside_unit() and not _unit_started(files, timeout):
            nbdproc.start_host(files, timeout=timeout)
        pid = _wait(files, timeout)
    finally:
        os.close(fd)
    if pid is None:
        raise ServeError(f"the host disk server does not answer on {files.control}")
    return pid, True


def add(
    files: HostFiles,
    export: str,
    image: str,
    passphrase: bytes,
    *,
    readonly: bool,
    keyslot: int | None = None,
    bind: Binding | None = None,
    fence_fd: int | None = None,
    timeout: float = 60.0,
) -> None:
    """Add `image` as `export` (the KDF runs in the server: `timeout` covers it)."""
    b = None if bind is None else control.Bind(bind.uuid, bind.domain)
    req = Add(export, image, bytearray(passphrase), readonly, keyslot, b,
              fence=fence_fd is not None)  # fmt: skip
    try:
        with HostClient(str(files.control), timeout=timeout) as c:
            c.call(req, fence_fd=fence_fd)
    finally:
        req.wipe()


def remove(files: HostFiles, export: str, *, force: bool) -> bool:
    """Remove `export`; False if the server did not serve it (or is not running)."""
    try:
        with HostClient(str(files.control)) as c:
            c.call(Remove(export, force))
    except HostUnavailable:
        return False
    except HostServerError as e:
        if e.code == control.Code.NOT_FOUND:
            return False
        raise
    return True


def exports(files: HostFiles) -> dict[str, ExportInfo] | None:
    """The server's exports by name; None if no server answers."""
    try:
        with HostClient(str(files.control), timeout=10) as c:
            return {e.name: e for e in c.call(List()).exports()}
    except (HostUnavailable, HostServerError):
        return None


def clients(info: ExportInfo) -> list[str]:
    """The export's connected clients, as `serve.users` names them."""
    return [f"NBD client {usage.process(p) or f'pid {p}'}" for p in info.clients]


# -- the server's events, into the audit trail ----------------------------------------------


def _cursor(files: HostFiles) -> Path:
    return files.run_dir / "nbd-events.seen"


def _seen(files: HostFiles, pid: int) -> int:
    try:
        text = nbdproc.read_own(_cursor(files), 64).decode()
        at, seq = (int(x) for x in text.split())
    except (OSError, ValueError, UnicodeDecodeError):
        return 0
    return seq if at == pid else 0


def audit_events(store: Keystore, files: HostFiles) -> int:
    """Audit the server's refusals not audited yet (one row each, against the export's disk's
    VM); how many. The last one audited is kept per server pid in RUN/nbd-events.seen."""
    pid = ping(files)
    if pid is None:
        return 0
    after = _seen(files, pid)
    try:
        with HostClient(str(files.control), timeout=10) as c:
            events = c.call(Events(after)).events()
    except (HostUnavailable, HostServerError):
        return 0
    if not events:
        return 0
    vms = {d.name: d.vm for d in store.run(lambda r: r.list_disks())}
    rows = [(f"disk.export.{ev.kind}", vms.get(ev.export),
             {"export": ev.export, "pid": ev.pid, "reason": ev.reason[:500],
              "server_pid": pid, "seq": ev.seq}) for ev in events]  # fmt: skip

    async def write(r: Repository) -> None:
        for action, vm, detail in rows:
            await r.append_audit(SERVER_ACTOR, action, vm, detail)

    store.run(write)
    tmp = _cursor(files).with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with os.fdopen(os.open(tmp, paths.NEW_FILE, 0o600), "w") as f:
        f.write(f"{pid} {events[-1].seq}\n")
    os.replace(tmp, _cursor(files))
    return len(events)
