"""A real QEMU with usb-redir slots, a keystore and `usbgate run` for usbgate's gateway tests.

The fixtures (tests/usbgate/conftest.py) start one QEMU (two usb-redir slots), one keystore and
one `usbgate run` process per test module; tests set the VM's rules through the keystore
repository, as `vmshield usb` does, and watch QEMU over QMP and its debug=3 stderr.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.models import UsbAction
from keystore.sqlite.connection import initialise
from keystore.sqlite.repository import SqliteRepository
from scripts.lab.qmp import QemuWithRedir
from usbgate.rules.policy import parse_rule
from usbgate.simulator import FakeDevice, FakeOwner

VM = "vm1"
FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
USBGATE = Path(sys.executable).with_name("usbgate")


class Keystore:
    """The keystore file the gateway reads, written through the keystore's own repository."""

    def __init__(self, path: Path, vms: tuple[str, ...] = (VM,)) -> None:
        self.path = path
        self.vms = vms
        initialise(path)
        self.run(self._setup)

    async def _setup(self, repo: SqliteRepository) -> None:
        await repo.add_principal("alice", b"alice-password", actor="test")
        for vm in self.vms:
            await repo.add_vm(vm, "alice", actor="test")

    def run(self, fn: Any) -> Any:
        async def go() -> Any:
            repo = await SqliteRepository.open(self.path, policy=FAST)
            try:
                return await fn(repo)
            finally:
                await repo.close()

        return asyncio.run(go())

    async def _add(self, repo: SqliteRepository, text: str, position: int | None,
                   vm: str = VM) -> None:  # fmt: skip
        r = parse_rule(text)
        await repo.add_usb_rule(vm, UsbAction(r.action.value), r.vendor_id, r.product_id,
                                actor="test", device_class=r.device_class,
                                interfaces=r.interfaces, serial=r.serial,
                                position=position)  # fmt: skip

    def set_rules(self, *texts: str, vm: str = VM) -> None:
        async def replace(repo: SqliteRepository) -> None:
            for _ in await repo.list_usb_rules(vm):
                await repo.remove_usb_rule(vm, 1, actor="test")
            for text in texts:
                await self._add(repo, text, None, vm)

        self.run(replace)

    def prepend_rule(self, text: str, vm: str = VM) -> float:
        """Insert ``text`` as rule 1 (one write transaction, as `vmshield usb block` does);
        returns the wall-clock time the write returned, i.e. just after its COMMIT."""
        done: list[float] = []

        async def add(repo: SqliteRepository) -> None:
            await self._add(repo, text, 1, vm)
            done.append(time.time())

        self.run(add)
        return done[0]

    def last_change_time(self, action: str) -> float:
        """Wall-clock time of the last ``action`` audit row: stamped inside the same write
        transaction as the change, just before COMMIT, so it never comes after the commit."""
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as conn:
            (ts,) = conn.execute("SELECT ts FROM audit WHERE action = ? ORDER BY seq DESC "
                                 "LIMIT 1", (action,)).fetchone()  # fmt: skip
        return datetime.fromisoformat(ts).timestamp()

    def audit_rows(self) -> list[tuple[str, dict[str, Any], str]]:
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT action, detail, ts FROM audit WHERE actor = 'usbgate' "
                                "ORDER BY seq").fetchall()  # fmt: skip
        return [(a, json.loads(d), ts) for a, d, ts in rows]

    def wait_audit(self, action: str, vid_pid: str, count: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 5
        while True:
            found = [d for a, d, _ in self.audit_rows()
                     if a == action and d.get("device", {}).get("vid_pid") == vid_pid]  # fmt: skip
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


class AttachWatch:
    """Polls QMP `attached` of one slot in a thread and remembers when it changed."""

    def __init__(self, qemu: QemuWithRedir, slot: int = 0) -> None:
        self.qemu, self.slot = qemu, slot
        self.seen: list[tuple[float, bool]] = []  # (wall-clock time, attached)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            now = self.qemu.attached(self.slot)
            if now != last:
                self.seen.append((time.time(), now))
                last = now
            time.sleep(0.0005)

    def first(self, value: bool) -> float | None:
        return next((t for t, v in self.seen if v == value), None)

    def wait_for(self, value: bool, timeout: float = 5.0) -> float:
        deadline = time.monotonic() + timeout
        while (seen := self.first(value)) is None:
            assert time.monotonic() < deadline, f"attached never became {value}"
            time.sleep(0.001)
        return seen

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def attaching_lines(qemu: QemuWithRedir, vid_pid: str) -> list[str]:
    return [line for line in qemu.lines("attaching") if vid_pid in line]


async def offer(gateway: dict[str, Any], device: FakeDevice) -> FakeOwner:
    return await FakeOwner.connect(gateway["address"], device)


def wait_detached(qemu: QemuWithRedir) -> None:
    for slot in (0, 1):
        qemu.wait_attached(False, slot)
