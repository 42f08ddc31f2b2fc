"""`scripts/bench`: every server of ``servers.SERVERS`` in one run, one table, optional JSON.

Per repetition, each server is started and read from once (start to first byte; key
derivation is outside the timed window), left to settle, then nbdcopy writes the random source
file through it and reads the export back into ``null:`` at each request size
(``--no-extents --connections=1 --requests=16``), and ``qemu-img bench -d 16`` writes and
reads through QEMU's NBD client; memory is read from /proc after the runs.
The throughput images use a cheap PBKDF2 cost because nbdkit's luks filter derives the key on
every connection; unlock time at cryptsetup's default cost is measured on a separate image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from scripts.lab.bench.disk import images
from scripts.lab.bench.disk.measure import Running
from scripts.lab.bench.disk.report import Report, Row, size_label
from scripts.lab.bench.disk.servers import SERVERS, Paths, Server, before

MIB = 1 << 20
SETTLE = 1.5
"""Seconds between a server's first answer and its timed runs, for every server: vmshield
answers on its numpy path while its numba kernels load (~0.3-1 s), and the runs measure the
steady state; start-to-first-answer is its own column."""
REQUEST_SIZES = (4096, 64 << 10, 1 << 20)
FILL_WITH = {"plain": "file", "luks": "luks", "luks2": "vmshield-luks2"}
"""Which server fills each image kind before timing (a neutral C server; no C server here
reads LUKS2, so the LUKS2 image is filled through the plugin itself)."""


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        return out.splitlines()[0] if out else "?"

    from nbd_plugin.crypto import jit

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "data_path": jit.reason(),
        "host": platform.node(),
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nbdkit": version(["nbdkit", "--version"]),
        "qemu-nbd": version(["qemu-nbd", "--version"]),
        "nbdcopy": version(["nbdcopy", "--version"]),
        "qemu-img": version(["qemu-img", "--version"]),
    }


class Workspace:
    """Image files under ``root`` (one filesystem), sockets under a short /tmp dir."""

    def __init__(self, root: str, size: int, kinds: set[str]) -> None:
        self.dir = tempfile.mkdtemp(dir=root, prefix="vmshield-bench-")
        self.sockets = tempfile.mkdtemp(dir="/tmp", prefix="vb-")
        self.passphrase = os.path.join(self.dir, "passphrase")
        self.source = os.path.join(self.dir, "source.bin")
        self.images = {
            "plain": os.path.join(self.dir, "plain.img"),
            "luks": os.path.join(self.dir, "luks1.img"),
            "luks2": os.path.join(self.dir, "luks2-4k.img"),
        }
        self.unlock_image = os.path.join(self.dir, "luks1-default-cost.img")
        images.write_passphrase(self.passphrase)
        images.random_file(self.source, size)
        if "plain" in kinds:
            images.sparse_file(self.images["plain"], size)
        if "luks" in kinds:
            images.luks1_image(self.images["luks"], size, self.passphrase, iterations=1000)
        if "luks2" in kinds:
            images.luks2_image(self.images["luks2"], size, self.passphrase)

    def paths(self, server: Server, image: str | None = None) -> Paths:
        return Paths(
            socket=os.path.join(self.sockets, f"{server.key}.sock"),
            image=image or self.images[server.image],
            passphrase_file=self.passphrase,
        )

    def log(self, server: Server) -> str:
        return os.path.join(self.dir, f"{server.key}.log")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.sockets, ignore_errors=True)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fill(ws: Workspace, servers: list[Server]) -> None:
    by_key = {s.key: s for s in SERVERS + servers}
    for kind in sorted({s.image for s in servers}):
        filler = by_key[FILL_WITH[kind]]
        say(f"filling the {kind} image through {filler.key}")
        with Running(filler, ws.paths(filler), ws.log(filler)) as r:
            r.write(ws.source, 1 << 20)


def measure_unlock(ws: Workspace, rows: list[Row]) -> None:
    """First connection after start, and one more, on a LUKS image at the default PBKDF2 cost."""
    luks_rows = [r for r in rows if r.server.image == "luks"]
    if not luks_rows:
        return
    say("creating a LUKS1 image at cryptsetup's default PBKDF2 cost")
    images.luks1_image(ws.unlock_image, 16 * MIB, ws.passphrase, iterations=None)
    for row in luks_rows:
        paths = ws.paths(row.server, ws.unlock_image)
        with Running(row.server, paths, ws.log(row.server)) as r:
            row.unlock_s = r.ready_after
            row.reconnect_s = r.time_connect()
        say(f"  {row.server.key}: {row.unlock_s:.2f} s, reconnect {row.reconnect_s:.2f} s")


def run(
    servers: list[Server],
    size: int,
    request_sizes: list[int],
    runs: int,
    root: str,
    qemu_sizes: list[int] | None = None,
) -> Report:
    rows = [Row(s) for s in servers]
    qemu_sizes = list(qemu_sizes or [])
    report = Report(size, request_sizes, runs, rows, machine(), qemu_sizes, size)
    ws = Workspace(root, size, {s.image for s in servers})
    try:
        fill(ws, servers)
        for rep in range(runs):
            for row in rows:
                say(f"run {rep + 1}/{runs}: {row.server.key}")
                with Running(row.server, ws.paths(row.server), ws.log(row.server)) as r:
                    started = r.ready_after
                    row.startup_s = min(row.startup_s or started, started)
                    time.sleep(SETTLE)  # vmshield's kernels load in the background
                    for rs in request_sizes:
                        row.add("write", rs, r.write(ws.source, rs))
                        row.add("read", rs, r.read(rs))
                    for rs in qemu_sizes:
                        row.add("qemu write", rs, r.qemu_bench(rs, size, write=True))
                        row.add("qemu read", rs, r.qemu_bench(rs, size, write=False))
                    row.peak_rss_kib = max(row.peak_rss_kib, r.peak_rss_kib())
                    row.add_memory(r.memory_kib())
        measure_unlock(ws, rows)
    finally:
        ws.remove()
    return report


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        default="256M",
        help="bytes per run and image size (256M: ~10 minutes here; 1G is steadier, ~40)",
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions, best kept (3)")
    parser.add_argument(
        "--request-sizes", default="4k,64k,1m", help="nbdcopy --request-size values (4k,64k,1m)"
    )
    parser.add_argument(
        "--servers",
        default=",".join(s.key for s in SERVERS),
        help=f"rows to run ({','.join(s.key for s in SERVERS)})",
    )
    parser.add_argument(
        "--qemu-sizes",
        default="64k,1m",
        help="qemu-img bench -d 16 request sizes, through QEMU's NBD client ('' for none)",
    )
    parser.add_argument("--dir", default="/dev/shm", help="where the images live (/dev/shm)")
    parser.add_argument(
        "--before",
        metavar="TREE",
        help="also run TREE's plugin (e.g. `git worktree add /tmp/old HEAD~1`) as rows "
        "'before' and 'before-luks2', alternating with the others in the same runs",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    opts = parser.parse_args(args)
    size = parse_size(opts.size) // MIB * MIB
    if size < MIB:
        parser.error("--size must be at least 1 MiB")
    wanted = opts.servers.split(",")
    unknown = set(wanted) - {s.key for s in SERVERS}
    if unknown:
        parser.error(f"unknown servers {', '.join(sorted(unknown))}")
    servers = [s for s in SERVERS if s.key in wanted]
    if opts.before:
        try:
            servers += before(opts.before)
        except FileNotFoundError as exc:
            parser.error(str(exc))
    sizes = [parse_size(x) for x in opts.request_sizes.split(",")]
    qemu_sizes = [parse_size(x) for x in opts.qemu_sizes.split(",") if x.strip()]
    started = time.monotonic()
    report = run(servers, size, sizes, opts.runs, opts.dir, qemu_sizes)
    m = report.machine
    print(f"{m['date']}, {m['cpu']}, {m['cores']} cores, {m['kernel']}, {m['nbdkit']}")
    print(f"vmshield data path: {m['data_path']}")
    print(report.markdown())
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
    return 0


__all__ = ["main", "run", "size_label"]


if __name__ == "__main__":
    sys.exit(main())
