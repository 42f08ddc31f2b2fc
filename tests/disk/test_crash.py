"""Crash consistency: SIGKILL the server mid-workload, restart, check every sector.

Two libnbd connections (multi-conn) write concurrently: single 512-byte units interleaved
between the connections in one region (so every write is a read-modify-write of a 4 KiB block
that the other connection also writes), runs of up to 64 KiB in a region each. Writes carry
FUA at random; flushes are issued at random on either connection and cover what both had
acknowledged before (multi-conn). Every 512-byte unit holds (magic, unit, generation) and a
filler derived from them, so after a restart each unit is checked to be whole (not torn, not
garbage) and not older than its last durable write (acknowledged with FUA, or acknowledged
before a flush that succeeded).

A SIGKILL ends the server, not the kernel: the page cache survives it, so this proves what
the server itself must get right (nothing acknowledged before it reached the kernel, no lost
read-modify-write update between connections, whole sectors), not what only a power cut
shows; test_faults.py covers a failing write-back.

VMSHIELD_CRASH_KILLS=N sets the kills per LUKS version (default 12); the long run is
    VMSHIELD_CRASH_KILLS=300 .venv/bin/python -m pytest tests/disk/test_crash.py -s
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nbd_plugin import luks
from tests.support.luks2 import OUR_PBKDF2
from tests.support.nbd import ROOT, SECRET, plugin_args

UNIT = 512
SIZE = 4 << 20
SHARED_UNITS = 512  # [0, 256 KiB): 512-byte writes, unit parity = connection
REGION = (SIZE - SHARED_UNITS * UNIT) // 2
MAGIC = b"vmsCRASH"
HEAD = struct.Struct("<8sQQ")
KILLS = int(os.environ.get("VMSHIELD_CRASH_KILLS", "12"))


def unit_bytes(unit: int, gen: int) -> bytes:
    head = HEAD.pack(MAGIC, unit, gen)
    filler = hashlib.sha256(head).digest() * ((UNIT - HEAD.size) // 32 + 1)
    return head + filler[: UNIT - HEAD.size]


def unit_gen(unit: int, data: bytes) -> int | None:
    """The generation a unit holds (0: never written), None when it is torn or garbage."""
    if data == bytes(UNIT):
        return 0
    magic, got_unit, gen = HEAD.unpack_from(data)
    if magic != MAGIC or got_unit != unit or data != unit_bytes(unit, gen):
        return None
    return int(gen)


@dataclass
class Model:
    """What each connection wrote and what is durable."""

    durable: dict[int, int] = field(default_factory=dict)
    """unit -> generation that must survive (or be overtaken by a later one)."""
    written: dict[int, int] = field(default_factory=dict)
    """unit -> highest generation ever issued."""
    acked: list[tuple[int, int]] = field(default_factory=list)
    """(unit, gen) acknowledged without FUA and not yet covered by a flush."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("writes", "fua", "flushes", "durable_units", "kills"), 0))  # fmt: skip

    def issue(self, units: range) -> list[tuple[int, int]]:
        with self.lock:
            out = []
            for u in units:
                self.written[u] = self.written.get(u, 0) + 1
                out.append((u, self.written[u]))
            return out

    def ack(self, gens: list[tuple[int, int]], fua: bool) -> None:
        with self.lock:
            self.stats["writes"] += 1
            if fua:
                self.stats["fua"] += 1
                self._durable(gens)
            else:
                self.acked.extend(gens)

    def flush_issued(self) -> int:
        with self.lock:
            return len(self.acked)

    def flush_done(self, covered: int) -> None:
        with self.lock:
            self.stats["flushes"] += 1
            self._durable(self.acked[:covered])
            del self.acked[:covered]

    def _durable(self, gens: list[tuple[int, int]]) -> None:
        for u, g in gens:
            if g > self.durable.get(u, 0):
                self.durable[u] = g


def _units_of(conn: int, rng: random.Random) -> range:
    """Units one connection may write: its parity in the shared region, or its own region."""
    if rng.random() < 0.5:
        u = rng.randrange(conn, SHARED_UNITS, 2)
        return range(u, u + 1)
    base = SHARED_UNITS + conn * (REGION // UNIT)
    n = rng.randint(1, 128)
    start = base + rng.randrange(REGION // UNIT - n)
    return range(start, start + n)


def worker(sock: str, conn: int, model: Model, seed: int, stop: threading.Event) -> None:
    import nbd

    rng = random.Random(seed)
    h = nbd.NBD()
    try:
        h.connect_unix(sock)
        while not stop.is_set():
            units = _units_of(conn, rng)
            gens = model.issue(units)
            data = b"".join(unit_bytes(u, g) for u, g in gens)
            fua = rng.random() < 0.3
            h.pwrite(data, units.start * UNIT, nbd.CMD_FLAG_FUA if fua else 0)
            model.ack(gens, fua)
            if rng.random() < 0.15:
                covered = model.flush_issued()
                h.flush()
                model.flush_done(covered)
    except nbd.Error:
        pass  # the server was killed; the handle closes when it is collected


@contextmanager
def server(
    image: Path, keyfile: Path, sockdir: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    sock, pidfile = sockdir / "c.sock", sockdir / "c.pid"
    for p in (sock, pidfile):
        p.unlink(missing_ok=True)
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile)]
    proc = subprocess.Popen([*argv, *plugin_args(image, keyfile)], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and pidfile.stat().st_size):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.01)
        yield str(sock), proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        sock.unlink(missing_ok=True)  # a killed nbdkit leaves its socket


def check(sock: str, model: Model) -> list[str]:
    """Problems found reading the whole disk back (empty: consistent)."""
    import nbd

    h = nbd.NBD()
    h.connect_unix(sock)
    try:
        disk = b"".join(h.pread(1 << 20, off) for off in range(0, SIZE, 1 << 20))
    finally:
        h.shutdown()
    problems = []
    for u in range(SIZE // UNIT):
        gen = unit_gen(u, disk[u * UNIT : (u + 1) * UNIT])
        if gen is None:
            problems.append(f"unit {u}: torn or garbage")
        elif gen < model.durable.get(u, 0):
            problems.append(f"unit {u}: gen {gen} < durable {model.durable[u]}: write lost")
        elif gen > model.written.get(u, 0):
            problems.append(f"unit {u}: gen {gen} was never written")
        else:
            # what survived is the new floor: the next round checks against it
            model.durable[u] = gen
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["luks1", "luks2"])
def test_sigkill_mid_workload_loses_no_durable_write(
    fmt: str, tmp_path: Path, keyfile: Path, sockdir: Path
) -> None:
    image = tmp_path / "disk.img"
    opts = {"iterations": 1000} if fmt == "luks1" else OUR_PBKDF2
    luks.create_image(str(image), SIZE, SECRET, fmt=fmt, **opts)  # type: ignore[arg-type]
    model = Model()
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    problems: list[str] = []
    for kill in range(KILLS + 1):
        with server(image, keyfile, sockdir) as (sock, proc):
            problems += [f"after kill {kill}: {p}" for p in check(sock, model)]
            if kill == KILLS or problems:
                break
            model.acked.clear()  # what the kill did not make durable is checked no more
            stop = threading.Event()
            threads = [
                threading.Thread(target=worker, args=(sock, c, model, rng.random(), stop))
                for c in (0, 1)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.set()
            for t in threads:
                t.join(timeout=30)
            model.stats["kills"] += 1
    model.stats["durable_units"] = len(model.durable)
    print(f"crash {fmt}: {model.stats}")
    assert not problems, problems[:20]
    assert model.stats["kills"] == KILLS
    assert model.stats["fua"] and model.stats["flushes"], model.stats
