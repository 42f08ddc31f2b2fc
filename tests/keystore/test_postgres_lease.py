"""One writer per image, cluster-wide: `disk serve` on a PostgreSQL keystore takes a lease.

Two `vmshield disk serve` processes with their own run dirs stand in for two hosts serving
the same image from shared storage (real nbdkit, real PostgreSQL). Exactly one wins; the
other is told who holds the lease. Killing the winner's database session ends its lease
(the holder fences its nbdkit), and the other host can then take over.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from keystore.cli import main
from keystore.location import Location
from keystore.models import Disk
from keystore.postgres import connection as pgconn
from keystore.postgres import lease as pglease
from keystore.postgres import repository as pg_repo
from keystore.services import lease, nbdproc
from tests.support.cli import FAST
from tests.support.postgres import Cluster

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
PW = b"disk-password-4711"


def _serve(url: str, sock: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [VMSHIELD, "disk", "serve", "web1-0", "--socket", str(sock), "--json", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "VMSHIELD_DB": url},
    )  # fmt: skip


def _lease_rows(url: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        return [(str(h), int(b)) for h, b in conn.execute("SELECT holder, backend FROM leases")]


@pytest.fixture
def keystore(pg_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(pg_repo, "AuthPolicy", lambda: FAST)
    url = pg_cluster.keystore()
    for args, secret in (
        (("user", "add", "alice"), PW + b"\n"),
        (("vm", "add", "web1", "--owner", "alice"), None),
        (("disk", "create", "web1", "--size", "8M", "--pbkdf-iterations", "1000",
          "--path", str(tmp_path / "web1-0.img")), PW + b"\n"),
    ):  # fmt: skip
        r = CliRunner().invoke(main, list(args), input=secret, env={"VMSHIELD_DB": url})
        assert r.exit_code == 0, r.output
    return url


def test_two_hosts_serve_one_image_exactly_one_wins_then_takeover(
    keystore: str, pg_cluster: Cluster, sockdir: Path
) -> None:
    socks = {h: sockdir / h / "web1-0.sock" for h in ("hostA", "hostB")}
    procs = {h: _serve(keystore, s) for h, s in socks.items()}
    results = {h: p.communicate(PW.decode(), timeout=120) for h, p in procs.items()}
    codes = {h: procs[h].returncode for h in procs}
    winners = [h for h, c in codes.items() if c == 0]
    assert len(winners) == 1, (codes, results)
    winner = winners[0]
    loser = "hostB" if winner == "hostA" else "hostA"
    err = results[loser][1]
    assert "already served read-write by host" in err and str(socks[winner]) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert nbdproc.probe(socks[winner]) and not nbdproc.probe(socks[loser])
    [(holder, _)] = _lease_rows(keystore)
    assert str(socks[winner]) in holder

    # the winner's host loses its database session: its lease ends, its nbdkit is fenced
    db = urllib.parse.urlsplit(keystore).path.lstrip("/")
    assert pg_cluster.terminate(db, application_name="vmshield-lease") == 1
    deadline = time.monotonic() + 15
    while nbdproc.probe(socks[winner]):
        assert time.monotonic() < deadline, "the fenced server still answers"
        time.sleep(0.05)
    fenced = (socks[winner].with_suffix(".lease.log")).read_text()
    assert "lease of web1-0 lost" in fenced

    _out, err = _serve(keystore, socks[loser]).communicate(PW.decode(), timeout=120)
    assert nbdproc.probe(socks[loser]), err
    [(holder, _)] = _lease_rows(keystore)
    assert str(socks[loser]) in holder

    # a clean stop releases the lease (and the lock: a new serve can take it)
    _stop(keystore)


def _stop(url: str) -> None:
    r = subprocess.run([VMSHIELD, "disk", "stop", "web1-0"], capture_output=True, text=True,
                       env={**os.environ, "VMSHIELD_DB": url}, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while _lease_rows(url):
        assert time.monotonic() < deadline, "the lease outlived its server"
        time.sleep(0.05)


def test_readers_share_the_lease_and_exclude_a_writer(keystore: str) -> None:
    """The lease itself, on three sessions (on one machine `disk serve` would already be
    refused by the local server record, before the lease is asked)."""
    conns = [pgconn.connect_sync(keystore) for _ in range(3)]
    try:
        disk_id = int(conns[0].execute("SELECT id FROM disks").fetchone()[0])
        assert not pglease.try_take(conns[0], disk_id, "web1-0", "host A reader", readonly=True)
        assert not pglease.try_take(conns[1], disk_id, "web1-0", "host B reader", readonly=True)
        with pytest.raises(pglease.LeaseHeld, match="served read-only by host A reader"):
            pglease.try_take(conns[2], disk_id, "web1-0", "host C writer", readonly=False)
        pglease.release(conns[0], disk_id)
        pglease.release(conns[1], disk_id)
        # released cleanly: nothing left behind, the writer serves at once
        assert not pglease.try_take(conns[2], disk_id, "web1-0", "host C writer", readonly=False)
        with pytest.raises(pglease.LeaseHeld, match="served read-write by host C writer"):
            pglease.try_take(conns[0], disk_id, "web1-0", "host A reader", readonly=True)
        conns[2].close()  # the writer's session ends: so does its lease, row or not
        # The server lets go of a closed session's locks when its backend exits, a moment
        # after the client hangs up: a taker retries, as disk serve's takeover would.
        deadline = time.monotonic() + 10
        while True:
            try:
                # the dead writer's row is left behind: the taker must wait out lease.GRACE
                assert pglease.try_take(conns[0], disk_id, "web1-0", "host A reader", readonly=True)
                break
            except pglease.LeaseHeld:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert [h for h, _ in _lease_rows(keystore)] == ["host A reader"]
    finally:
        for c in conns:
            c.close()


def test_lease_log_is_not_opened_through_a_planted_symlink(keystore: str, sockdir: Path) -> None:
    """A socket directory another user made: the lease holder's log `DISK.lease.log` was
    opened with O_TRUNC through their symlink, as root, before the directory was checked."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the attack is root using a directory another user owns")
    victim = sockdir / "victim"
    victim.write_text("root's precious file\n")
    shared = sockdir / "shared"
    shared.mkdir(mode=0o777)
    os.chown(shared, 65534, 65534)
    (shared / "web1-0.lease.log").symlink_to(victim)
    p = _serve(keystore, shared / "web1-0.sock")
    _, err = p.communicate(PW.decode(), timeout=120)
    assert victim.read_text() == "root's precious file\n"
    assert p.returncode != 0 and "belongs to uid 65534" in err
    assert err.strip().count("\n") == 0, err
    assert _lease_rows(keystore) == []


async def _disk(url: str) -> Disk:
    async with await pg_repo.PostgresRepository.open(url, policy=FAST) as repo:
        return await repo.get_disk("web1-0")


def _holder_pid(sock: Path) -> int:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"keystore.services.lease" in argv and os.fsencode(sock) in argv:
                return int(d.name)
    raise AssertionError(f"no lease holder for {sock}")


@pytest.mark.parametrize("how", ["holder SIGKILLed", "session terminated"])
def test_a_lost_lease_stops_its_server_before_the_lease_is_served_elsewhere(
    keystore: str, sockdir: Path, pg_cluster: Cluster, how: str
) -> None:
    """B13: SIGKILL (or OOM) of the lease holder freed the lease within 0.1 s while its nbdkit
    went on acknowledging FUA writes: two hosts writing one image; a clean fence (the holder's
    session ended) acknowledged 1-2 writes after the lock was free. Now nbdkit refuses I/O once
    the holder is gone or fences, and its last acknowledged write precedes the moment a taker,
    having got the lock, may serve (lock + lease.GRACE)."""
    import nbd

    sock = sockdir / "hostA" / "web1-0.sock"
    _out, err = _serve(keystore, sock).communicate(PW.decode(), timeout=120)
    assert nbdproc.probe(sock), err
    files = nbdproc.ServerFiles(sock)
    acks: list[float] = []
    refused: list[float] = []
    stop = threading.Event()
    client = nbd.NBD()
    client.connect_unix(str(sock))

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                client.pwrite(b"w" * 4096, (i % 256) * 4096, nbd.CMD_FLAG_FUA)
            except nbd.Error:
                refused.append(time.monotonic())
                return
            acks.append(time.monotonic())
            i += 1

    thread = threading.Thread(target=writer)
    try:
        with psycopg.connect(keystore, autocommit=True) as taker:
            disk_id = int(taker.execute("SELECT id FROM disks").fetchone()[0])  # type: ignore[index]
            thread.start()
            while len(acks) < 20:
                assert thread.is_alive(), "no write went through"
                time.sleep(0.01)
            if how == "holder SIGKILLed":
                os.kill(_holder_pid(sock), signal.SIGKILL)
            killed = time.monotonic()
            if how == "session terminated":
                db = urllib.parse.urlsplit(keystore).path.lstrip("/")
                assert pg_cluster.terminate(db, application_name=lease.APPLICATION) == 1
            lock = (pglease.LEASE_CLASS, disk_id)
            while not taker.execute("SELECT pg_try_advisory_lock(%s, %s)", lock).fetchone()[0]:  # type: ignore[index]
                assert time.monotonic() - killed < 15, "the dead holder's lease never came free"
                time.sleep(0.002)
            free = time.monotonic()
            taker.execute("SELECT pg_advisory_unlock(%s, %s)", lock)
        thread.join(10)
        assert refused, "nbdkit went on acknowledging writes after its lease holder died"
        deadline = time.monotonic() + 10
        while nbdproc.probe(sock):  # and it shuts itself down (no one is left to SIGTERM it)
            assert time.monotonic() < deadline, "the fenced server still answers"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
        pid = nbdproc.read_pid(files.pidfile)
        if pid:
            nbdproc.stop(pid, files)
    # the next host's holder finds the row left behind and waits out the grace period
    disk = asyncio.run(_disk(keystore))
    taking = time.monotonic()
    held = lease.take(
        Location.parse(keystore), disk, sockdir / "hostB" / "web1-0.sock", readonly=False
    )
    assert held is not None and time.monotonic() - taking >= lease.GRACE
    held.abort()
    last = max(acks)
    ms = {k: round((t - killed) * 1000, 1) for k, t in
          (("lease free", free), ("last ack", last), ("first refused", refused[0]))}  # fmt: skip
    print(f"\n{how}, ms after: {ms}; {len(acks)} writes acknowledged")
    assert last < free + lease.GRACE


def test_a_holder_whose_database_stops_answering_fences_after_the_deadline(
    keystore: str, sockdir: Path
) -> None:
    """B13: a holder cut off from the database (here its server process is stopped: the
    connection stays open, nothing answers) waited on it for ever while its nbdkit served; the
    server would free the lock once its keepalives gave up. Now the holder fences after
    lease.DEADLINE s without an answer, well before the server's keepalives end the session."""
    sock = sockdir / "hostA" / "web1-0.sock"
    _out, err = _serve(keystore, sock).communicate(PW.decode(), timeout=120)
    assert nbdproc.probe(sock), err
    db = urllib.parse.urlsplit(keystore).path.lstrip("/")
    with psycopg.connect(keystore, autocommit=True) as conn:
        [(backend,)] = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
            (lease.APPLICATION, db),
        ).fetchall()
    os.kill(backend, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while nbdproc.probe(sock):
            assert time.monotonic() - stopped < lease.DEADLINE + 10, "the server still answers"
            time.sleep(0.05)
        fenced = time.monotonic() - stopped
    finally:
        os.kill(backend, signal.SIGCONT)
    print(f"\ndatabase silent: nbdkit stopped after {fenced:.2f} s (deadline {lease.DEADLINE} s)")
    assert lease.DEADLINE - 2 * lease.PING <= fenced < lease.DEADLINE + 5
    assert "no answer from the database" in sock.with_suffix(".lease.log").read_text()
