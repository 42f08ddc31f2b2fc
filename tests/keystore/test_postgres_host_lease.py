"""The cluster-wide lease with the host disk server (issue 22): one holder, one session.

On a PostgreSQL keystore the exports of a host disk server share ONE lease holder
(keystore/services/hostlease.py): one PostgreSQL session, one advisory lock per export, one
fence pipe per export (its read end went to the server with the add, SCM_RIGHTS). Removing
an export releases only its lock; losing the session (pg_terminate_backend) or the holder
(SIGKILL) fences every export of the host at once, the server itself goes on. Real
PostgreSQL, real host nbdkit, libnbd as client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from keystore.cli import main
from keystore.postgres import repository as pg_repo
from keystore.postgres.lease import LEASE_CLASS, LeaseHeld
from keystore.services import hostdisk, hostlease
from keystore.services.nbdproc import HostFiles
from keystore.services.store import Keystore
from tests.support.cli import FAST
from tests.support.postgres import Cluster

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
PW = b"disk-password-4711"
DISKS = ("web1-0", "web1-1", "web1-2")


@pytest.fixture
def keystore(pg_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(pg_repo, "AuthPolicy", lambda: FAST)
    url = pg_cluster.keystore()
    steps: list[tuple[tuple[str, ...], bytes | None]] = [
        (("user", "add", "alice"), PW + b"\n"),
        (("vm", "add", "web1", "--owner", "alice"), None),
    ]
    for disk in DISKS:
        steps.append((("disk", "create", "web1", "--size", "8M", "--pbkdf-iterations", "1000",
                       "--path", str(tmp_path / f"{disk}.img")), PW + b"\n"))  # fmt: skip
    for args, secret in steps:
        r = CliRunner().invoke(main, list(args), input=secret, env={"VMSHIELD_DB": url})
        assert r.exit_code == 0, r.output
    return url


@pytest.fixture
def sockdir(sockdir: Path) -> Iterator[Path]:
    """The run directories' host servers end with the test, whatever it found."""
    yield sockdir
    for pidfile in sockdir.glob("*/nbd.pid"):
        pid = hostdisk.ping(HostFiles(pidfile.parent))
        if pid is not None:
            os.kill(pid, signal.SIGTERM)


def run(url: str, *args: str, secret: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMSHIELD, *args], input=None if secret is None else secret.decode(),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VMSHIELD_DB": url})  # fmt: skip


def vmshield(url: str, *args: str, secret: bytes | None = None) -> str:
    r = run(url, *args, secret=secret)
    assert r.returncode == 0, r.stderr
    return r.stdout


def serve(url: str, disk: str, run_dir: Path) -> str:
    """Serve `disk` on `run_dir`'s host server; its NBD URI."""
    out = vmshield(url, "disk", "serve", disk, "--run-dir", str(run_dir), "--json",
                   secret=PW + b"\n")  # fmt: skip
    return out.split('"uri": "')[1].split('"')[0]


def holders(run_dir: Path | None = None) -> list[int]:
    """Pids of the lease holder processes (of `run_dir`'s host server; or per-disk ones)."""
    module = b"keystore.services.hostlease" if run_dir else b"keystore.services.lease"
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if module in argv and (run_dir is None or os.fsencode(run_dir) in argv):
                found.append(int(d.name))
    return found


def sessions(url: str) -> list[int]:
    """Backend pids of the host lease holders' sessions on this keystore's database."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                            "AND datname = current_database()",
                            (hostlease.APPLICATION,)).fetchall()  # fmt: skip
    return [int(r[0]) for r in rows]


def locks(url: str) -> dict[int, list[int]]:
    """backend pid -> the disk ids of its lease locks (pg_locks)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT l.pid, l.objid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objsubid = 2 AND l.granted "
            "AND d.datname = current_database() ORDER BY l.objid", (LEASE_CLASS,)
        ).fetchall()  # fmt: skip
    found: dict[int, list[int]] = {}
    for pid, objid in rows:
        found.setdefault(int(pid), []).append(int(objid))
    return found


def disk_ids(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {str(n): int(i) for i, n in conn.execute("SELECT id, name FROM disks").fetchall()}


def pattern(disk: str) -> bytes:
    return (disk.encode() * 4096)[:4096]


def write(uri: str, data: bytes) -> bool:
    """True if the write was acknowledged, False if the server refused it (or the export)."""
    import nbd

    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error:
        return False
    try:
        h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    except nbd.Error:
        return False
    finally:
        h.shutdown()
    return True


def read(uri: str) -> bytes:
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return bytes(h.pread(4096, 0))
    finally:
        h.shutdown()


def wait_until(what: str, cond: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_one_holder_one_session_one_lock_per_export(keystore: str, sockdir: Path) -> None:
    host_a, host_b = sockdir / "hostA", sockdir / "hostB"
    uris = {d: serve(keystore, d, host_a) for d in DISKS}
    ids = disk_ids(keystore)

    # 3 exports: 1 holder process, 1 PostgreSQL session holding 3 advisory locks
    assert len(holders(host_a)) == 1 and holders() == []
    (backend,) = sessions(keystore)
    assert locks(keystore) == {backend: sorted(ids[d] for d in DISKS)}
    assert all(write(uris[d], pattern(d)) for d in DISKS)

    # a second host (its own holder, against the same cluster) cannot lease a leased disk;
    # (a `disk serve` here stops earlier, at the `servers` record: another host has none)
    store = Keystore(keystore)
    with pytest.raises(LeaseHeld) as held:
        hostlease.take(store.location, store.run(lambda r: r.get_disk("web1-0")),
                       HostFiles(host_b), "web1-0", readonly=False)  # fmt: skip
    assert (
        f"already served read-write by host {socket.gethostname()} pid {holders(host_a)[0]}"
        in str(held.value)
        and f"{host_a / 'nbd.sock'} export web1-0" in str(held.value)
    )
    assert len(holders(host_b)) == 1 and len(sessions(keystore)) == 2
    assert locks(keystore) == {backend: sorted(ids[d] for d in DISKS)}

    # removing an export releases its lock only, at once
    vmshield(keystore, "disk", "stop", "web1-1")
    assert locks(keystore) == {backend: sorted(ids[d] for d in ("web1-0", "web1-2"))}
    assert write(uris["web1-0"], pattern("web1-0")) and write(uris["web1-2"], pattern("web1-2"))

    # ...so the second host may now serve it, with a second holder and session
    uri_b = serve(keystore, "web1-1", host_b)
    assert read(uri_b) == pattern("web1-1")
    assert len(holders(host_b)) == 1 and len(sessions(keystore)) == 2
    assert len(locks(keystore)) == 2

    for disk in DISKS:
        vmshield(keystore, "disk", "stop", disk)
    assert locks(keystore) == {}
    for where in (host_a, host_b):
        os.kill(hostdisk.ping(HostFiles(where)) or 0, signal.SIGTERM)
    # idle holders leave by themselves
    wait_until("the idle holders did not exit", lambda: not holders(host_a) and
               not holders(host_b), timeout=hostlease.IDLE + 10)  # fmt: skip


@pytest.mark.parametrize("loss", ["sigkill", "terminate"])
def test_losing_the_holder_or_its_session_fences_every_export(
    keystore: str, sockdir: Path, loss: str
) -> None:
    run_dir = sockdir / "host"
    host = HostFiles(run_dir)
    uris = {d: serve(keystore, d, run_dir) for d in DISKS}
    server = hostdisk.ping(host)
    assert all(write(uris[d], pattern(d)) for d in DISKS)
    (holder,) = holders(run_dir)

    if loss == "sigkill":  # the kernel closes every fence pipe's write end
        os.kill(holder, signal.SIGKILL)
    else:  # the holder's session ends: it fences everything and removes the exports
        (backend,) = sessions(keystore)
        with psycopg.connect(keystore, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
    wait_until(
        "an export went on writing without its lease",
        lambda: not any(write(uris[d], pattern(d)) for d in DISKS),
    )
    wait_until("the holder outlived its leases", lambda: not holders(run_dir))
    assert hostdisk.ping(host) == server  # the server itself goes on
    wait_until("the locks outlived the holder", lambda: locks(keystore) == {})
    if loss == "terminate":
        log = hostlease.log_path(host).read_text()
        assert "the lease session was lost" in log
        for d in DISKS:
            assert f"fenced export {d}" in log and f"removed export {d} of pid {server}" in log
        assert hostdisk.exports(host) == {}
    else:  # nobody could remove them: they stay, refusing I/O, until stopped
        assert set(hostdisk.exports(host) or {}) == set(DISKS)
        r = run(keystore, "disk", "serve", "web1-0", "--run-dir", str(run_dir),
                secret=PW + b"\n")  # fmt: skip
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "already served" in r.stderr and "disk stop web1-0" in r.stderr
        for d in DISKS:
            vmshield(keystore, "disk", "stop", d, "--force")

    # the next serve starts a new holder; what was acknowledged is on disk
    again = {d: serve(keystore, d, run_dir) for d in DISKS}
    assert all(read(again[d]) == pattern(d) for d in DISKS)
    (new,) = holders(run_dir)
    assert new != holder and len(sessions(keystore)) == 1
    for d in DISKS:
        vmshield(keystore, "disk", "stop", d)
    os.kill(server or 0, signal.SIGTERM)
