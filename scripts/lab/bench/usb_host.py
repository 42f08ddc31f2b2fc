"""`scripts/bench usb --only host`: one `usbgate host serve` for 1, 10, 100 VMs vs `usbgate run`.

1. Memory: one `usbgate host serve` started with one VM, then grown to 10 and 100 VMs over
   its control socket (`usbgate host add`); after each step its private memory, PSS and RSS
   (/proc/PID/smaps_rollup). Reported: MiB per added VM between the steps (target <= 1 MiB),
   and the private memory of one `usbgate run` (what each VM costs today).
2. Revocation: every served VM has a simulated stick attached through the gateway to a
   usb-guest peer playing QEMU's part (this process); a block rule for ONE VM is committed
   to the keystore (SQLite); measured from the commit (the wall-clock time stamped on its
   audit row inside the transaction, before COMMIT) to the device_disconnect reaching that
   VM's QEMU peer. Medians at 1 and 100 VMs under one host, and under `usbgate run`.
Both on an SQLite keystore, and with `--only host-pg` on a throwaway PostgreSQL cluster (rule
changes pushed by NOTIFY: one LISTEN connection for the host's 100 VMs).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from keystore.auth import AuthPolicy
from keystore.models import UsbAction
from keystore.sqlite.connection import initialise
from keystore.sqlite.repository import SqliteRepository
from usbgate.simulator import FakeDevice, FakeOwner
from usbgate.usbredir.codec import CLOSED, NEED_DATA, Connection
from usbgate.usbredir.packets import DeviceConnect, DeviceDisconnect, Hello
from usbgate.usbredir.wire import ALL_CAPABILITIES, Role

USBGATE = Path(sys.executable).with_name("usbgate")
FAST = AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
MIB = 1 << 20
STEPS = (1, 10, 100)


def vm_name(n: int) -> str:
    return f"vm{n:03d}"


# --- the keystore ----------------------------------------------------------------------------


class Store:
    """The keystore the gateways read: an SQLite file, or a PostgreSQL database URL."""

    def __init__(self, location: Path | str) -> None:
        self.location = location

    @property
    def db(self) -> str:
        return str(self.location)

    def _run(self, fn: Any) -> Any:
        async def go() -> Any:
            if isinstance(self.location, Path):
                repo: Any = await SqliteRepository.open(self.location, policy=FAST)
            else:
                from keystore.postgres.repository import PostgresRepository

                repo = await PostgresRepository.open(self.location, policy=FAST)
            try:
                return await fn(repo)
            finally:
                await repo.close()

        return asyncio.run(go())

    def create(self, vms: int) -> None:
        """`vms` VMs, each allowing the simulated stick."""
        if isinstance(self.location, Path):
            initialise(self.location)

        async def setup(repo: Any) -> None:
            await repo.add_principal("owner", b"owner-password", actor="bench")
            for n in range(vms):
                await repo.add_vm(vm_name(n), "owner", actor="bench")
                await repo.add_usb_rule(vm_name(n), UsbAction.ALLOW, 0x0781, 0x5567,
                                        actor="bench")  # fmt: skip

        self._run(setup)

    def block(self, vm: str) -> float:
        """`vmshield usb block VM 0781:5567 --position 1`: the time stamped on its audit row
        inside the transaction, before COMMIT (not usbgate's own rows that follow it)."""
        self._run(lambda repo: repo.add_usb_rule(vm, UsbAction.BLOCK, 0x0781, 0x5567,
                                                 actor="bench", position=1))  # fmt: skip
        sql = "SELECT ts FROM audit WHERE actor = 'bench' ORDER BY seq DESC LIMIT 1"
        if isinstance(self.location, Path):
            with sqlite3.connect(f"file:{self.location}?mode=ro", uri=True) as conn:
                (ts,) = conn.execute(sql).fetchone()
            return datetime.fromisoformat(ts).timestamp()
        import psycopg

        with psycopg.connect(self.location) as pg:
            row = pg.execute(sql).fetchone()
        assert row is not None
        stamp = row[0]
        return float(stamp.timestamp() if isinstance(stamp, datetime) else
                     datetime.fromisoformat(str(stamp)).timestamp())  # fmt: skip

    def unblock(self, vm: str) -> None:
        self._run(lambda repo: repo.remove_usb_rule(vm, 1, actor="bench"))


# --- QEMU's part -----------------------------------------------------------------------------


class FakeQemu:
    """A usb-guest peer on a unix socket: says hello, notes device_connect and the wall-clock
    time a device_disconnect arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connected = asyncio.Event()
        self.disconnected_at: float | None = None
        self.gone = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    def reset(self) -> None:
        self.connected.clear()
        self.gone.clear()
        self.disconnected_at = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(Role.GUEST)
        writer.write(conn.send(Hello("bench-qemu", (int(ALL_CAPABILITIES),))))
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    continue
                if event is CLOSED:
                    break
                if isinstance(event, DeviceConnect):
                    self.connected.set()
                elif isinstance(event, DeviceDisconnect) and self.disconnected_at is None:
                    self.disconnected_at = time.time()
                    self.gone.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.gone.set()
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


class Loop:
    """An event loop in its own thread: the QEMU peers and owners live there, so the
    disconnect is stamped while the main thread commits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


# --- the processes ---------------------------------------------------------------------------


def memory(pid: int) -> dict[str, float]:
    """Private (clean + dirty), PSS and RSS of `pid` in MiB, from /proc/PID/smaps_rollup."""
    kib: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        kib[key] = int(rest.split()[0])
    private = kib["Private_Clean"] + kib["Private_Dirty"]
    return {"private": round(private / 1024, 2), "pss": round(kib["Pss"] / 1024, 2),
            "rss": round(kib["Rss"] / 1024, 2)}  # fmt: skip


@contextlib.contextmanager
def started(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while b"listening" not in log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"usbgate did not start: {log.read_text()}")
                time.sleep(0.02)
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)


def _settle(pid: int) -> dict[str, float]:
    time.sleep(1.0)  # the event loop's first polls, lazily imported modules
    return memory(pid)


class Workdir:
    def __init__(self, root: Path, store: Store) -> None:
        self.root = root
        self.store = store
        self.control = root / "usbgate.ctl"

    def listen(self, n: int) -> str:
        return f"unix:{self.root}/l{n:03d}.sock"

    def qemu(self, n: int) -> Path:
        return self.root / f"q{n:03d}.sock"

    def spec(self, n: int) -> str:
        return f"{vm_name(n)}={self.listen(n)},unix:{self.qemu(n)}"

    def add(self, n: int) -> None:
        argv = [str(USBGATE), "host", "add", vm_name(n), "--listen", self.listen(n), "--qemu",
                f"unix:{self.qemu(n)}", "--control", str(self.control)]  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=30)


# --- the measures ----------------------------------------------------------------------------


Memory = dict[str, float]


def _revocations(
    work: Workdir, loop: Loop, vms: int, target: int, runs: int, pid: int | None = None
) -> tuple[list[float], Memory | None]:
    """Attach a stick on each of `vms` VMs, then `runs` times: block `target`'s stick, time
    the disconnect at its QEMU peer, unblock it and plug the stick back in. With `pid`, also
    the memory of that process once every stick is attached."""
    peers = [FakeQemu(work.qemu(n)) for n in range(vms)]

    async def plug(n: int) -> FakeOwner:
        owner = await FakeOwner.connect(work.listen(n), FakeDevice())
        await asyncio.wait_for(peers[n].connected.wait(), 10)
        return owner

    async def setup() -> list[FakeOwner]:
        for peer in peers:
            await peer.start()
        return [await plug(n) for n in range(vms)]

    owners = loop.run(setup())
    attached = None if pid is None else _settle(pid)
    latencies = []
    try:
        for _ in range(runs):
            peer = peers[target]
            committed = work.store.block(vm_name(target))
            loop.run(asyncio.wait_for(peer.gone.wait(), 10))
            assert peer.disconnected_at is not None, "the gateway closed without a disconnect"
            latencies.append(peer.disconnected_at - committed)
            loop.run(owners[target].close())
            work.store.unblock(vm_name(target))
            time.sleep(0.05)  # the unblock is seen at the next poll
            peer.reset()
            owners[target] = loop.run(plug(target))
    finally:

        async def teardown() -> None:
            for owner in owners:
                await owner.close()
            for peer in peers:
                peer.close()

        loop.run(teardown())
    return latencies, attached


def _ms(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": round(statistics.median(values) * 1000, 2),
            "max": round(max(values) * 1000, 2), "min": round(min(values) * 1000, 2)}  # fmt: skip


def bench_host(root: Path, runs: int, *, postgres: bool = False) -> dict[str, Any]:
    """The measures on an SQLite keystore, or (``postgres``) a throwaway PostgreSQL cluster."""
    if not postgres:
        return _bench(Workdir(root, Store(root / "keystore.db")), runs)
    from scripts.lab.tempcluster import running_cluster

    with running_cluster() as cluster:
        return _bench(Workdir(root, Store(cluster.keystore())), runs)


def _bench(work: Workdir, runs: int) -> dict[str, Any]:
    root = work.root
    work.store.create(max(STEPS))
    db = work.store.db
    results: dict[str, Any] = {"memory_mib": {}, "revocation_ms": {}}
    loop = Loop()
    try:
        # today: one `usbgate run` per VM
        run_argv = [str(USBGATE), "run", "--vm", vm_name(0), "--listen", work.listen(0),
                    "--qemu", f"unix:{work.qemu(0)}", "--db", db]  # fmt: skip
        with started(run_argv, root / "run.log") as proc:
            results["memory_mib"]["usbgate_run_1_vm"] = _settle(proc.pid)
            latencies, attached = _revocations(work, loop, 1, 0, runs, proc.pid)
            results["revocation_ms"]["usbgate_run_1_vm"] = _ms(latencies)
            results["memory_mib"]["usbgate_run_1_vm_with_a_stick_attached"] = attached
        # one host, grown 1 -> 10 -> 100 VMs over its control socket
        host_argv = [str(USBGATE), "host", "serve", "--control", str(work.control), "--db",
                     db, "--vm", work.spec(0)]  # fmt: skip
        with started(host_argv, root / "host.log") as proc:
            steps = {1: _settle(proc.pid)}
            latencies, attached = _revocations(work, loop, 1, 0, runs, proc.pid)
            results["revocation_ms"]["host_1_vm"] = _ms(latencies)
            results["memory_mib"]["host_1_vm_with_a_stick_attached"] = attached
            served = 1
            for count in STEPS[1:]:
                for n in range(served, count):
                    work.add(n)
                served = count
                steps[count] = _settle(proc.pid)
            latencies, attached = _revocations(work, loop, served, served // 2, runs, proc.pid)
            results["revocation_ms"][f"host_{served}_vms"] = _ms(latencies)
            results["memory_mib"]["host"] = {str(k): v for k, v in steps.items()}
            results["memory_mib"][f"host_{served}_vms_each_with_a_stick_attached"] = attached
        per_vm = {}
        for low, high in itertools.pairwise(STEPS):
            grew = steps[high]["private"] - steps[low]["private"]
            per_vm[f"{low}_to_{high}"] = round(grew / (high - low), 3)
        results["memory_mib"]["host_private_per_added_vm"] = per_vm
    finally:
        loop.close()
    return results
