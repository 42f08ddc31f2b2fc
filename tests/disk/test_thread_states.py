"""A Python thread state per nbdkit connection, not per request (serve/threadstate.py).

nbdkit's Python plugin makes and destroys a thread state around every callback on a thread
that has none: an mmap, a munmap and a gettid per request (strace), more than a 4 KiB
pread costs. The plugin keeps the connection thread's state from open to close. These tests
count those system calls of a real nbdkit under strace, check that closing gives every
state back (no growth over hundreds of connections), and drive ``ThreadStates`` on threads.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.serve.threadstate import ThreadStates
from tests.disk.test_host_server import add, host_server, nbd_open
from tests.support.nbd import connect, luks1_image, serve_plugin

SIZE = 8 << 20
REQUESTS = 1000
# Per connection: the handshake's own callbacks (open, get_size, can_*...) run before open()
# keeps the state, and the ones after close() run without it; each costs one mmap, munmap and
# gettid. Far below one per request: without the kept state, 2 * REQUESTS of each.
PER_CONNECTION = 40


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return luks1_image(tmp_path, SIZE)


def pid_of(sock: str) -> int:
    return int(Path(sock + ".pid").read_text())


def wait_for_kernels(sock: str) -> None:
    """Until the kernels are loaded (nbdkit -v logs it): compiling maps memory of its own."""
    log, deadline = Path(sock + ".err"), time.monotonic() + 120
    while "ready in" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.05)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def wait_until_idle(pid: int) -> None:
    """Until the process used no CPU for 0.5 s (its kernels compiled or loaded)."""
    deadline, last, still = time.monotonic() + 120, -1, 0
    while still < 5:
        assert time.monotonic() < deadline, "the server did not go idle"
        ticks = cpu_ticks(pid)
        still, last = (still + 1 if ticks == last else 0), ticks
        time.sleep(0.1)


@contextmanager
def syscall_counts(pid: int, out: Path) -> Iterator[dict[str, int]]:
    """Count mmap, munmap and gettid of every thread of ``pid`` (strace -f -c) inside."""
    counts: dict[str, int] = {}
    proc = subprocess.Popen(
        ["strace", "-f", "-c", "-e", "trace=mmap,munmap,gettid", "-o", str(out), "-p", str(pid)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    attached = proc.stderr.readline()  # "strace: Process N attached" once it traces
    assert "attached" in attached, attached
    try:
        yield counts
    finally:
        time.sleep(0.2)  # the connection thread's last callback (close) has returned
        proc.send_signal(2)
        proc.wait(timeout=30)
    for line in out.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("mmap", "munmap", "gettid"):
            counts[fields[-1]] = int(fields[3])  # % time, seconds, usecs/call, calls


def requests(h: object, n: int) -> None:
    block = bytes(range(256)) * 16
    for i in range(n):
        h.pwrite(block, (i % 256) * 4096)  # type: ignore[attr-defined]
        assert h.pread(4096, (i % 256) * 4096) == block  # type: ignore[attr-defined]


def test_a_connection_keeps_one_thread_state_for_all_its_requests(
    image: Path, keyfile: Path, sockdir: Path, tmp_path: Path
) -> None:
    with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-v",)) as sock:
        wait_for_kernels(sock)
        with connect(sock) as h:
            requests(h, 10)
        with syscall_counts(pid_of(sock), tmp_path / "strace.out") as counts, connect(sock) as h:
            requests(h, REQUESTS)
    # 2000 requests; before the kept state: >= 2000 of each
    assert counts, "strace saw no mmap, munmap or gettid at all"
    for call in ("mmap", "munmap", "gettid"):
        assert counts.get(call, 0) < PER_CONNECTION, counts


def test_the_host_server_keeps_one_per_connection_too(tmp_path: Path, sockdir: Path) -> None:
    image = tmp_path / "a.img"
    luks.create_image(str(image), SIZE, b"pw-a", iterations=1000)
    with host_server(sockdir) as host:
        add(host, "a", image, b"pw-a")
        h = nbd_open(host, "a")
        requests(h, 10)
        h.shutdown()  # type: ignore[attr-defined]
        wait_until_idle(host.pid())  # the host server loads the kernels after its first add
        with syscall_counts(host.pid(), tmp_path / "strace.out") as counts:
            h = nbd_open(host, "a")
            requests(h, REQUESTS)
            h.shutdown()  # type: ignore[attr-defined]
    for call in ("mmap", "munmap", "gettid"):
        assert counts.get(call, 0) < PER_CONNECTION, counts


def vm_data_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1])
    raise AssertionError("no VmData")


def test_closed_connections_give_their_thread_states_back(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    """300 connections one after another: a state kept past close() would stay allocated
    (its frame stack alone is a 16 KiB mapping: ~4.7 MiB of VmData for 300)."""
    with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-v",)) as sock:
        wait_for_kernels(sock)
        pid = pid_of(sock)
        for _ in range(20):  # let allocators and thread stack caches settle
            with connect(sock) as h:
                requests(h, 2)
        before = vm_data_kib(pid)
        for _ in range(300):
            with connect(sock) as h:
                requests(h, 2)
        time.sleep(0.2)
        grown = vm_data_kib(pid) - before
    assert grown < 1024, f"VmData grew by {grown} KiB over 300 connections"


def test_clients_killed_mid_copy_leave_no_thread_state_behind(
    image: Path, keyfile: Path, sockdir: Path
) -> None:
    """100 nbdcopy clients SIGKILLed 0-60 ms into a copy (before, during or after the
    handshake, with requests in flight): nbdkit still closes each connection it opened, on
    its thread, and close() gives the state back (100 kept ones: ~1.6 MiB of VmData)."""

    rng = random.Random(25)
    with serve_plugin(image, keyfile, sockdir, nbdkit_opts=("-v",)) as sock:
        wait_for_kernels(sock)
        pid = pid_of(sock)
        for _ in range(10):
            with connect(sock) as h:
                requests(h, 2)
        before = vm_data_kib(pid)
        for _ in range(100):
            copy = subprocess.Popen(
                ["nbdcopy", "--request-size=4096", f"nbd+unix:///?socket={sock}", "null:"],
                stderr=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(0, 0.06))
            copy.send_signal(signal.SIGKILL)
            copy.wait()
        with connect(sock) as h:  # the server still serves
            requests(h, 2)
        time.sleep(0.3)
        grown = vm_data_kib(pid) - before
    assert grown < 512, f"VmData grew by {grown} KiB over 100 killed clients"


def test_keep_and_drop_on_threads() -> None:
    states = ThreadStates()
    states.drop()  # nothing kept on this thread: nothing given back
    assert len(states) == 0
    states.keep()
    states.keep()  # a second keep on the same thread keeps nothing more
    assert len(states) == 1

    kept_elsewhere = threading.Event()
    release = threading.Event()

    def other(drop: bool) -> None:
        states.drop()  # the main thread's kept state is not this thread's to give back
        states.keep()
        kept_elsewhere.set()
        release.wait(10)
        if drop:
            states.drop()

    t = threading.Thread(target=other, args=(True,))
    t.start()
    assert kept_elsewhere.wait(10)
    assert len(states) == 2
    release.set()
    t.join()
    assert len(states) == 1
    states.drop()
    assert len(states) == 0

    # a thread that ends without drop keeps its state (a PARALLEL worker); a new thread,
    # even one that reuses its id, keeps and gives back its own
    kept_elsewhere.clear()
    release.clear()
    t = threading.Thread(target=other, args=(False,))
    t.start()
    assert kept_elsewhere.wait(10)
    release.set()
    t.join()
    assert len(states) == 1
    done: list[int] = []

    def fresh() -> None:
        states.keep()
        states.drop()
        done.append(len(states))

    t = threading.Thread(target=fresh)
    t.start()
    t.join()
    assert done == [1]


def test_without_libpython_symbols_nothing_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that loaded libpython privately (no global PyGILState_*): serve as before."""
    from nbd_plugin.serve import threadstate

    monkeypatch.setattr(threadstate, "_ensure", None)
    monkeypatch.setattr(threadstate, "_release", None)
    states = ThreadStates()
    states.keep()
    assert len(states) == 0
    states.drop()  # nothing kept, nothing released (a None _release would raise)
    assert len(states) == 0
