"""Start a server, time nbdcopy and qemu-img bench against it, read its CPU and memory.

Every time is an outside clock (``time.perf_counter`` around the client process); CPU time
and memory come from the server's /proc files.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass
from types import TracebackType

from scripts.lab.bench.disk.servers import Paths, Server

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 120.0


class BenchError(Exception):
    """A server or nbdcopy failed; the message says which and how."""


def uri(socket: str) -> str:
    return f"nbd+unix:///?socket={socket}"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def memory_kib(pid: int, images: Collection[str] = ()) -> dict[str, int]:
    """Rss, Pss and private (Private_Clean + Private_Dirty) KiB from /proc/PID/smaps,
    without the mappings of ``images``, whose resident pages are reported as ``image``.

    Private memory is what one more such server costs; Pss also charges a share of the
    libraries all the servers map (numba's LLVM, Python, numpy). vmshield maps each image's
    payload to decrypt from the page cache (nbd_plugin/crypto/mapped.py): those pages are
    the kernel's cache of the image, which any server reading it fills as much (pread
    copies out of the same pages), and which the kernel reclaims under memory pressure; they
    are counted apart, not as the server's memory."""
    real = {os.path.realpath(p) for p in images}
    totals = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    image_rss = 0
    in_image = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head, _, rest = line.partition(" ")
            if not head.endswith(":"):  # a mapping's first line: "start-end perms ... path"
                fields = line.split(maxsplit=5)
                in_image = len(fields) == 6 and fields[5].strip() in real
            elif head[:-1] in totals and rest.strip().endswith("kB"):
                kib = int(rest.split()[0])
                if not in_image:
                    totals[head[:-1]] += kib
                elif head == "Rss:":
                    image_rss += kib
    private = totals["Private_Clean"] + totals["Private_Dirty"]
    return {"rss": totals["Rss"], "pss": totals["Pss"], "private": private, "image": image_rss}


def first_byte(socket: str) -> None:
    """Connect and read the first 4 KiB: the server is up, unlocked and decrypting."""
    import nbd  # Debian's python3-libnbd

    h = nbd.NBD()
    try:
        h.connect_uri(uri(socket))
        h.pread(4096, 0)
        h.shutdown()
    except nbd.Error as exc:
        raise BenchError(f"first read from {socket} failed: {exc}") from None


def connect_once(socket: str) -> None:
    """Open one NBD connection and ask the size (the luks filter derives its key here)."""
    result = subprocess.run(
        ["nbdinfo", "--size", uri(socket)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"nbdinfo on {socket} failed: {result.stderr.strip()}")


@dataclass
class Sample:
    seconds: float
    cpu: float


class Running:
    """A started server: ``with Running(server, paths) as r: r.copy(...)``."""

    def __init__(self, server: Server, paths: Paths, log: str) -> None:
        self.server = server
        self.paths = paths
        self._log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 -- closed in __exit__
        self.proc = subprocess.Popen(
            server.argv(paths), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        self.started = time.perf_counter()
        try:
            self.ready_after = self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _wait_ready(self) -> float:
        """Seconds from start to the first 4 KiB read back (key derivation included)."""
        deadline = self.started + START_TIMEOUT
        while not os.path.exists(self.paths.socket):
            if self.proc.poll() is not None:
                raise BenchError(self._died())
            if time.perf_counter() > deadline:
                raise BenchError(f"{self.server.key}: no socket after {START_TIMEOUT:.0f} s")
            time.sleep(0.005)
        while True:  # the socket exists from bind(); connecting before listen() is refused
            try:
                first_byte(self.paths.socket)
                return time.perf_counter() - self.started
            except BenchError:
                if self.proc.poll() is not None:
                    raise BenchError(self._died()) from None
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.005)

    def _died(self) -> str:
        with open(self._log_path, errors="replace") as f:
            tail = f.read()[-2000:]
        return f"{self.server.key} exited with status {self.proc.returncode}:\n{tail}"

    def time_connect(self) -> float:
        start = time.perf_counter()
        connect_once(self.paths.socket)
        return time.perf_counter() - start

    def copy(self, source: str, dest: str, request_size: int) -> Sample:
        """Run nbdcopy once; seconds of wall time and the server's CPU seconds meanwhile."""
        argv = [
            "nbdcopy",
            "--no-extents",
            f"--request-size={request_size}",
            "--connections=1",
            "--requests=16",
            source,
            dest,
        ]
        return self._timed(argv)

    def _timed(self, argv: list[str]) -> Sample:
        """Run a client to its end: wall seconds, and the server's CPU seconds meanwhile."""
        cpu0 = cpu_seconds(self.proc.pid)
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds(self.proc.pid) - cpu0
        if result.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        return Sample(seconds, cpu)

    def read(self, request_size: int) -> Sample:
        return self.copy(uri(self.paths.socket), "null:", request_size)

    def write(self, source_file: str, request_size: int) -> Sample:
        return self.copy(source_file, uri(self.paths.socket), request_size)

    def qemu_bench(self, request_size: int, total: int, write: bool) -> Sample:
        """``qemu-img bench -d 16`` through QEMU's NBD client: ``total`` bytes in requests of
        ``request_size``. The fixed cost of starting qemu-img and connecting (a 1-request run,
        best of 3) is taken off, so the sample is the requests' time."""
        count = max(1, total // request_size)
        fixed = min(self._qemu_img(request_size, 1, write).seconds for _ in range(3))
        run = self._qemu_img(request_size, count, write)
        return Sample(max(run.seconds - fixed, 1e-6), run.cpu)

    def _qemu_img(self, request_size: int, count: int, write: bool) -> Sample:
        argv = ["qemu-img", "bench", "-f", "raw", "-d", "16", "-c", str(count)]
        argv += ["-s", str(request_size), *(["-w"] if write else []), uri(self.paths.socket)]
        return self._timed(argv)

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.proc.pid)

    def memory_kib(self) -> dict[str, int]:
        return memory_kib(self.proc.pid, [self.paths.image])

    def __enter__(self) -> Running:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        if os.path.exists(self.paths.socket):
            os.unlink(self.paths.socket)
