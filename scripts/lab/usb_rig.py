"""The thesis's USB experiment as a reusable rig: one booted USB guest, `usbgate run`, a keystore.

    with UsbRig.started(workdir) as rig:           # boots the guest (~10 s under TCG)
        rig.set_rules("allow id 0781:5567")
        image = make_stick_image(workdir / "s.img", {"data.bin": payload})
        with rig.plug(image) as stick:             # `usbgate simulate-stick` -> usbgate
            rig.guest.run("wait_stick 20 && stick_copy data.bin out.txt hello")
            committed = rig.prepend_rule("block id 0781:5567")   # revokes it
            rig.guest.wait_console("USB disconnect", committed)

Slot 0 of the guest's usb-redir devices is behind usbgate (``rig.plug(image)``); slot 1 is
connected straight to the stick (``rig.plug(image, direct=True)``), for side-by-side numbers.
Used by tests/usbgate/test_usb_e2e.py, `scripts/bench usb` and the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.models import UsbAction
from keystore.sqlite.connection import initialise
from keystore.sqlite.repository import SqliteRepository
from scripts.lab.guest import UsbGuest, build_guest
from scripts.lab.qmp import Qmp
from usbgate.rules.policy import parse_rule

VM = "usbvm"
STICK = (0x0781, 0x5567)
BIN = Path(sys.executable).parent
FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


def make_stick_image(path: Path, files: dict[str, bytes], size: int = 64 * 2**20) -> Path:
    """An ext2 image of `size` bytes holding `files` (mkfs.ext2 -d: no root, no loop device)."""
    src = path.with_suffix(".d")
    src.mkdir(exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    with path.open("wb") as f:
        f.truncate(size)
    # 4 KiB blocks (mkfs picks 1 KiB for small images): fewer indirect-block reads, as on
    # the large sticks the thesis copied to.
    argv = ["mkfs.ext2", "-q", "-F", "-b", "4096", "-L", "stick", "-d", str(src), str(path)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return path


def read_stick_file(image: Path, name: str) -> bytes:
    """A file of the stick's image, read with debugfs (the image is not mounted)."""
    out = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], check=True,
                         capture_output=True, timeout=60)  # fmt: skip
    return out.stdout


class Stick:
    """A running `usbgate simulate-stick` (the owner's side)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log = proc, log

    def unplug(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class UsbRig:
    """One guest, one usbgate for slot 0, one keystore; see the module docstring."""

    def __init__(self, workdir: Path, *, memory: int = 256, db: Path | None = None,
                 vm: str = VM) -> None:  # fmt: skip
        """`db`: an existing keystore where `vm` exists (the demo's); default: a new one."""
        self.workdir, self.vm = workdir, vm
        self.own_db = db is None
        self.db = db if db is not None else workdir / "keystore.db"
        self.guest = UsbGuest(build_guest(variant="usb"), workdir, slots=2, memory=memory)
        self.gateway_address = f"unix:{workdir / 'gate.sock'}"
        self.gateway_log = workdir / "usbgate.log"
        self.gateway: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None

    @classmethod
    @contextlib.contextmanager
    def started(cls, workdir: Path, **kw: Any) -> Iterator[UsbRig]:
        rig = cls(workdir, **kw)
        try:
            rig.start()
            yield rig
        finally:
            rig.stop()

    def start(self) -> None:
        if self.own_db:
            initialise(self.db)
            self._repo(self._setup)
        self.guest.start()
        self.qmp = Qmp(self.guest.qmp_path)
        with self.gateway_log.open("wb") as log:
            self.gateway = subprocess.Popen(
                [str(BIN / "usbgate"), "run", "--vm", self.vm, "--listen", self.gateway_address,
                 "--qemu", f"unix:{self.guest.chardev_path(0)}", "--db", str(self.db), "-v"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while b"listening on" not in self.gateway_log.read_bytes():
            if self.gateway.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("usbgate did not start:\n" + self.gateway_log.read_text())
            time.sleep(0.02)

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.terminate()
            self.gateway.wait(10)
        if self.qmp is not None:
            self.qmp.close()
        self.guest.stop()

    # -- the keystore -------------------------------------------------------------------------

    def _repo(self, fn: Callable[[SqliteRepository], Any]) -> Any:
        async def go() -> Any:
            repo = await SqliteRepository.open(self.db, policy=FAST)
            try:
                return await fn(repo)
            finally:
                await repo.close()

        return asyncio.run(go())

    async def _setup(self, repo: SqliteRepository) -> None:
        await repo.add_principal("owner", b"owner-password", actor="rig")
        await repo.add_vm(self.vm, "owner", actor="rig")

    async def _add(self, repo: SqliteRepository, text: str, position: int | None) -> None:
        r = parse_rule(text)
        await repo.add_usb_rule(self.vm, UsbAction(r.action.value), r.vendor_id, r.product_id,
                                actor="rig", device_class=r.device_class,
                                interfaces=r.interfaces, serial=r.serial,
                                position=position)  # fmt: skip

    def set_rules(self, *texts: str) -> None:
        """Replace the VM's rules (several transactions: not for timing)."""

        async def replace(repo: SqliteRepository) -> None:
            for _ in await repo.list_usb_rules(self.vm):
                await repo.remove_usb_rule(self.vm, 1, actor="rig")
            for text in texts:
                await self._add(repo, text, None)

        self._repo(replace)

    def prepend_rule(self, text: str) -> float:
        """Insert `text` as rule 1 in one transaction, as `vmshield usb ... --position 1` does;
        returns the wall-clock time stamped on its audit row inside that transaction, just
        before COMMIT: latencies measured from it are never flattered."""
        self._repo(lambda repo: self._add(repo, text, 1))
        return self.last_rule_change()

    def last_rule_change(self) -> float:
        """time.time() stamped on the newest usb.rule.add audit row (inside its transaction)."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            (ts,) = conn.execute("SELECT ts FROM audit WHERE action = 'usb.rule.add' "
                                 "ORDER BY seq DESC LIMIT 1").fetchone()  # fmt: skip
        return datetime.fromisoformat(ts).timestamp()

    def audit(self, action: str) -> list[str]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT detail FROM audit WHERE actor = 'usbgate' AND action = ?",
                                (action,)).fetchall()  # fmt: skip
        return [d for (d,) in rows]

    def wait_audit(self, action: str, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.audit(action)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}th {action} audit row in {timeout} s")
            time.sleep(0.01)

    # -- the stick and QEMU -------------------------------------------------------------------

    @contextlib.contextmanager
    def plug(self, image: Path, vid_pid: tuple[int, int] = STICK, *, direct: bool = False,
             serial: str = "4C530001") -> Iterator[Stick]:  # fmt: skip
        """`usbgate simulate-stick IMAGE` offered to usbgate (or straight to slot 1)."""
        target = f"unix:{self.guest.chardev_path(1)}" if direct else self.gateway_address
        log = self.workdir / f"stick-{time.monotonic_ns()}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "usbgate"), "simulate-stick", str(image), "--vid", f"{vid_pid[0]:04x}",
                 "--pid", f"{vid_pid[1]:04x}", "--serial", serial, "--connect", target],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        stick = Stick(proc, log)
        try:
            yield stick
        finally:
            stick.unplug()

    def attached(self, slot: int = 0) -> bool:
        assert self.qmp is not None
        return bool(self.qmp.execute("qom-get", path=f"/machine/peripheral/redir{slot}",
                                     property="attached"))  # fmt: skip

    def wait_attached(self, want: bool, slot: int = 0, timeout: float = 10) -> float:
        """Poll QMP (about every 0.5 ms) until `attached` is `want`; the time.time() seen."""
        deadline = time.monotonic() + timeout
        while self.attached(slot) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"redir{slot} attached != {want} after {timeout} s")
            time.sleep(0.0005)
        return time.time()

    def wait_gone(self, timeout: float = 20) -> None:
        """Until the guest has no USB device left (after an unplug or a revocation)."""
        deadline = time.monotonic() + timeout
        while self.guest.run("usb_devices").output.strip():
            if time.monotonic() > deadline:
                raise AssertionError("the guest still lists a USB device")
            time.sleep(0.1)
