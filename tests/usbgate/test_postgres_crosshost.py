"""Live rules across hosts: two `usbgate run --db postgresql://...` processes, each with its own
run dir and its own real QEMU, stand in for two hosts sharing one PostgreSQL keystore.

A rule change committed by "host A" (this process, its own connection, as `vmshield usb
block` on A does) must detach the device on host B within 100 ms of the commit, pushed by
NOTIFY. Then the connection of B's usbgate is killed (pg_terminate_backend) while the
database refuses new connections: B fails closed, and recovers when the database is back.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.models import UsbAction
from keystore.postgres import audit as pgaudit
from keystore.postgres.repository import PostgresRepository
from keystore.postgres.schema import USBGATE_ROLE
from scripts.lab.qmp import QEMU, QemuWithRedir, short_tmpdir
from tests.support.postgres import Cluster
from tests.support.usbgate_qemu import AttachWatch
from usbgate.simulator import FakeDevice, FakeOwner

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]

FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
USBGATE = Path(sys.executable).with_name("usbgate")
CHANGES = 20


class Host:
    """One "host": a run dir, a QEMU with one usb-redir slot, a usbgate for one VM."""

    def __init__(self, name: str, vm: str, url: str) -> None:
        self.name, self.vm = name, vm
        self.dir = short_tmpdir()
        self.qemu = QemuWithRedir(self.dir, slots=1)
        self.qemu.start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = f"tcp:127.0.0.1:{s.getsockname()[1]}"
        self.log_path = self.dir / "usbgate.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [str(USBGATE), "run", "--vm", vm, "--listen", self.address,
             "--qemu", f"unix:{self.qemu.chardev_path(0)}", "--db", url, "-v"],
            stdout=subprocess.DEVNULL, stderr=self._log,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while b"listening on" not in self.log_path.read_bytes():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "usbgate did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()
        self.qemu.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Admin:
    """Host A's side: rule changes through the repository, on its own connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.repo: PostgresRepository = self.loop.run_until_complete(
            PostgresRepository.open(url, policy=FAST)
        )

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def block_first(self, vm: str) -> float:
        """`vmshield usb block VM 0781:5567 --position 1`; the time its COMMIT returned."""
        self.run(self.repo.add_usb_rule(vm, UsbAction.BLOCK, 0x0781, 0x5567, actor="hostA",
                                        position=1))  # fmt: skip
        return time.time()

    def unblock(self, vm: str) -> None:
        self.run(self.repo.remove_usb_rule(vm, 1, actor="hostA"))

    def close(self) -> None:
        self.run(self.repo.close())
        self.loop.close()


@pytest.fixture(scope="module")
def keystore_url(pg_cluster: Cluster) -> str:
    url = pg_cluster.keystore()

    async def setup() -> None:
        async with await PostgresRepository.open(url, policy=FAST) as repo:
            await repo.add_principal("alice", b"alice-password", actor="test")
            for vm in ("vma", "vmb"):
                await repo.add_vm(vm, "alice", actor="test")
                await repo.add_usb_rule(vm, UsbAction.ALLOW, 0x0781, 0x5567, actor="test")

    asyncio.run(setup())
    with pg_cluster.admin() as conn:  # the usbgates log in with the least-privileged role
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'gate_hosts'").fetchone():
            conn.execute(f"CREATE ROLE gate_hosts LOGIN IN ROLE {USBGATE_ROLE}".encode())
    return url


def _as_usbgate(url: str) -> str:
    return url.replace("postgres@", "gate_hosts@")


@pytest.fixture(scope="module")
def hosts(keystore_url: str) -> Iterator[dict[str, Host]]:
    a = Host("A", "vma", _as_usbgate(keystore_url))
    try:
        b = Host("B", "vmb", _as_usbgate(keystore_url))
    except BaseException:
        a.stop()
        raise
    yield {"A": a, "B": b}
    a.stop()
    b.stop()


def _count(url: str, action: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM audit WHERE actor = 'usbgate' AND action = %s", (action,)
        ).fetchone()
    return int(row[0]) if row else 0


def _attach(host: Host, loop: asyncio.AbstractEventLoop) -> FakeOwner:
    async def go() -> FakeOwner:
        owner = await FakeOwner.connect(host.address, FakeDevice())
        await asyncio.to_thread(host.qemu.wait_attached, True, 0, 10.0)
        return owner

    return loop.run_until_complete(go())


def _close(owner: FakeOwner, loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.wait_for(owner.closed.wait(), 5))
    loop.run_until_complete(owner.close())


def test_block_on_host_a_detaches_on_host_b_within_100ms(
    hosts: dict[str, Host], keystore_url: str
) -> None:
    a, b = hosts["A"], hosts["B"]
    admin = Admin(keystore_url)
    loop = asyncio.new_event_loop()
    latencies = []
    try:
        bystander = _attach(a, loop)  # host A's own VM keeps its device throughout
        for _ in range(CHANGES):
            owner = _attach(b, loop)
            watch = AttachWatch(b.qemu)
            committed = admin.block_first("vmb")
            detached = watch.wait_for(False)
            watch.stop()
            latencies.append((detached - committed) * 1000)
            _close(owner, loop)
            admin.unblock("vmb")
            time.sleep(0.2)  # let B hear the unblock before the next offer
        assert a.qemu.attached(0), "a change to vmb's rules detached vma's device"
        loop.run_until_complete(bystander.close())
    finally:
        loop.close()
        admin.close()
    print(f"\ncross-host revocation, commit on A -> QEMU on B detached, {CHANGES} changes: "
          f"median {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms "
          f"({sorted(round(x, 1) for x in latencies)})")  # fmt: skip
    assert statistics.median(latencies) <= 100
    # both usbgates wrote their decisions into the one shared chain
    deadline = time.monotonic() + 5
    while (revoked := _count(keystore_url, "usb.revoked")) < CHANGES:
        assert time.monotonic() < deadline, f"only {revoked} usb.revoked rows"
        time.sleep(0.05)
    assert pgaudit.verify_sync(keystore_url).ok
    assert max(latencies) <= 250  # CI shares 2 cores; the median holds the 100 ms target


def test_vmshield_usb_block_on_host_a_detaches_on_host_b(
    hosts: dict[str, Host], keystore_url: str
) -> None:
    """The same through the real command on "host A" (its own process and connection)."""
    b = hosts["B"]
    loop = asyncio.new_event_loop()
    try:
        owner = _attach(b, loop)
        watch = AttachWatch(b.qemu)
        cmd = [str(USBGATE.with_name("vmshield")), "usb", "block", "vmb", "0781:5567",
               "--position", "1", "--db", keystore_url]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        exited = time.time()
        detached = watch.wait_for(False)
        watch.stop()
        _close(owner, loop)
    finally:
        loop.close()
    admin = Admin(keystore_url)
    try:
        admin.unblock("vmb")
    finally:
        admin.close()
    time.sleep(0.2)
    print(f"\n`vmshield usb block` on A -> detached on B {(detached - exited) * 1000:.1f} ms "
          "after the command exited")  # fmt: skip
    assert detached - exited <= 1.0  # the command's exit trails its COMMIT; generous for CI


def test_lost_connection_fails_closed_then_reconnects(
    hosts: dict[str, Host], keystore_url: str, pg_cluster: Cluster
) -> None:
    b = hosts["B"]
    db = urllib.parse.urlsplit(keystore_url).path.lstrip("/")
    loop = asyncio.new_event_loop()
    try:
        owner = _attach(b, loop)
        watch = AttachWatch(b.qemu)
        with pg_cluster.admin() as conn:
            conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false'.encode())
        try:
            assert pg_cluster.terminate(db) >= 1
            detached = watch.wait_for(False, timeout=5)  # attached devices go too
            _close(owner, loop)

            async def refused() -> bool:
                newcomer = await FakeOwner.connect(b.address, FakeDevice())
                await asyncio.wait_for(newcomer.filter_rejected.wait(), 5)
                await asyncio.sleep(0.3)
                await newcomer.close()
                return True

            assert loop.run_until_complete(refused())
            watch.stop()
            assert [v for _, v in watch.seen if v and _ > detached] == []
        finally:
            with pg_cluster.admin() as conn:
                conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true'.encode())
        # back-off tops out at 2 s: the listener is back, the rules with it
        deadline = time.monotonic() + 10
        while b"connection re-established" not in b.log_path.read_bytes():
            assert time.monotonic() < deadline, "usbgate B did not reconnect"
            time.sleep(0.05)
        time.sleep(0.05)  # the gateway's next 10 ms poll takes the re-read rules
        owner = _attach(b, loop)
        loop.run_until_complete(owner.close())
    finally:
        loop.close()
    log = b.log_path.read_text()
    assert "rules unreadable, denying every device" in log
    assert "keystore connection lost" in log
