"""`usbgate host serve --db postgresql://...`: one LISTEN connection for every VM of the host.

Two VMs, each with its own real QEMU, served by one `usbgate host serve` logged in with the
least-privileged usbgate role. A rule change committed for one VM (by an admin's own
connection, as `vmshield usb block` does) is pushed by NOTIFY and reaches that VM's gateway
only; a VM removed from the host hears nothing more; the whole host holds one listening
connection (plus the audit writer's), not one per VM.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.models import UsbAction
from keystore.postgres.repository import PostgresRepository
from keystore.postgres.schema import USBGATE_ROLE
from scripts.lab.qmp import QEMU, QemuWithRedir, short_tmpdir
from tests.support.postgres import Cluster
from tests.support.usbgate_qemu import USBGATE
from usbgate.simulator import FakeDevice, FakeOwner

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]

FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
ROLE = "gate_one_host"
SERVED = ("vma", "vmb")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp:127.0.0.1:{s.getsockname()[1]}"


async def _change(url: str, vm: str, action: UsbAction) -> None:
    """`vmshield usb block|allow VM 0781:5567 --position 1` on the admin's own connection."""
    async with await PostgresRepository.open(url, policy=FAST) as repo:
        await repo.add_usb_rule(vm, action, 0x0781, 0x5567, actor="admin", position=1)


@pytest.fixture(scope="module")
def keystore_url(pg_cluster: Cluster) -> str:
    url = pg_cluster.keystore()

    async def setup() -> None:
        async with await PostgresRepository.open(url, policy=FAST) as repo:
            await repo.add_principal("alice", b"alice-password", actor="test")
            for vm in (*SERVED, "vmc"):
                await repo.add_vm(vm, "alice", actor="test")
                await repo.add_usb_rule(vm, UsbAction.ALLOW, 0x0781, 0x5567, actor="test")

    asyncio.run(setup())
    with pg_cluster.admin() as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone():
            conn.execute(f"CREATE ROLE {ROLE} LOGIN IN ROLE {USBGATE_ROLE}".encode())
    return url


@pytest.fixture(scope="module")
def host(keystore_url: str) -> Iterator[dict[str, Any]]:
    workdir = short_tmpdir()
    qemu = {}
    for vm in SERVED:
        (workdir / vm).mkdir()
        qemu[vm] = QemuWithRedir(workdir / vm, slots=1)
        qemu[vm].start()
    address = {vm: _port() for vm in SERVED}
    log_path = workdir / "usbgate.log"
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    argv = [str(USBGATE), "host", "serve", "--control", str(workdir / "ctl"),
            "--db", keystore_url.replace("postgres@", f"{ROLE}@"), "-v"]  # fmt: skip
    for vm in SERVED:
        argv += ["--vm", f"{vm}={address[vm]},unix:{qemu[vm].chardev_path(0)}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 15
    while b"host listening" not in log_path.read_bytes():
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "usbgate host did not start"
        time.sleep(0.02)
    yield {"qemu": qemu, "address": address, "log": log_path, "proc": proc,
           "control": workdir / "ctl"}  # fmt: skip
    proc.terminate()
    proc.wait(10)
    log.close()
    for q in qemu.values():
        q.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def _backends(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                           (ROLE,)).fetchone()  # fmt: skip
    return int(row[0]) if row else 0


def _wait_log(path: Path, needle: str, start: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while needle not in path.read_text()[start:]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_notification_reaches_only_its_vm(host: dict[str, Any], keystore_url: str) -> None:
    qemu, log = host["qemu"], host["log"]

    async def scenario() -> None:
        owners = {}
        for vm in SERVED:
            owners[vm] = await FakeOwner.connect(host["address"][vm], FakeDevice())
            await asyncio.to_thread(qemu[vm].wait_attached, True, 0, 10.0)
        mark = len(log.read_text())
        await _change(keystore_url, "vma", UsbAction.BLOCK)
        await asyncio.to_thread(qemu["vma"].wait_attached, False, 0, 2.0)
        await _change(keystore_url, "vmc", UsbAction.BLOCK)  # a VM this host does not serve
        await asyncio.sleep(0.5)
        assert qemu["vmb"].attached(0), "vma's NOTIFY detached vmb's device"
        assert not owners["vmb"].closed.is_set()
        changed = log.read_text()[mark:]
        assert "vm vma: rules changed" in changed
        assert "vm vmb: rules changed" not in changed and "vmc" not in changed
        for owner in owners.values():
            await owner.close()

    asyncio.run(scenario())
    assert _backends(keystore_url) <= 2, "more than one LISTEN (+ the audit writer) for 2 VMs"


def test_a_removed_vm_hears_no_more_notifications(host: dict[str, Any], keystore_url: str) -> None:
    argv = [str(USBGATE), "host", "remove", "vmb", "--control", str(host["control"])]
    removed = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert removed.returncode == 0, removed.stderr
    mark = len(host["log"].read_text())
    asyncio.run(_change(keystore_url, "vmb", UsbAction.BLOCK))
    asyncio.run(_change(keystore_url, "vma", UsbAction.ALLOW))
    assert _wait_log(host["log"], "vm vma: rules changed", mark)  # NOTIFYs still arrive ...
    assert "vm vmb" not in host["log"].read_text()[mark:]  # ... but none for the removed VM
    assert host["proc"].poll() is None
