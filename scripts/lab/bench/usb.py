"""`scripts/bench usb`: what usbgate costs a USB stick, measured on a real guest (TCG).

1. Copy: the guest copies the same file (--size MiB) from two identical sticks plugged at once,
   one through usbgate (sda), one with QEMU's usb-redir connected straight to the stick (sdb),
   alternating, --runs times each, page cache dropped before each copy. Reported: median copy
   time each way and usbgate's cost in % of the direct copy time (the thesis: 3.2 %), the CPU
   time the usbgate process spent on each copy (load-independent, unlike the times) and the
   host's load average.
2. Transfers: GET_DESCRIPTOR round trips from a usb-guest peer (QEMU's role) to the
   simulated device, straight and through an in-process usbgate: the added microseconds; the
   same for whole 120 KiB READ(10) commands (CBW, data, CSW: what the copy is made of).
3. Revocation: while the guest reads the stick, a block rule is committed; time from the
   commit (its audit timestamp, taken before COMMIT) to the guest kernel's "USB disconnect".
4. Live allow: a stick plugged in while blocked; an allow rule is committed; time to QEMU's
   attached=true (QMP) and to the guest kernel's "new high-speed USB device".
5. Host (`--only host`, no guest): one `usbgate host serve` for 1, 10, 100 VMs against one
   `usbgate run`: private memory per added VM and the revocation median
   (scripts/usb_host_bench.py); `--only host-pg`: the same on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from scripts.lab.bench.usb_host import bench_host
from scripts.lab.qmp import short_tmpdir
from scripts.lab.usb_rig import UsbRig, make_stick_image
from usbgate.addresses import parse_address
from usbgate.gateway import Gateway
from usbgate.rules.policy import parse_rule
from usbgate.simulator import BULK_IN, BULK_OUT, FakeDevice, FakeOwner, MassStorageStick
from usbgate.sources import MemoryAuditSink, MemoryRuleSource
from usbgate.storage import BulkOnlyTransport, MemoryStore, ScsiDisk
from usbgate.storage.bot import CBW, CBW_SIGNATURE
from usbgate.usbredir.codec import NEED_DATA, Connection
from usbgate.usbredir.packets import BulkPacket, ControlPacket, DeviceConnect, Hello, Packet
from usbgate.usbredir.wire import ALL_CAPABILITIES, Role

MIB = 1 << 20


def summary(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    return {"n": len(values), "median": round(statistics.median(values) * scale, 3),
            "max": round(max(values) * scale, 3), "min": round(min(values) * scale, 3)}  # fmt: skip


# --- 1. copy ---------------------------------------------------------------------------------


def bench_copy(rig: UsbRig, size_mib: int, runs: int) -> dict[str, Any]:
    payload = bytes(range(256)) * (size_mib * MIB // 256)
    gated = make_stick_image(rig.workdir / "copy-gate.img", {"big.bin": payload},
                             size=(size_mib + 32) * MIB)  # fmt: skip
    direct = rig.workdir / "copy-direct.img"
    shutil.copyfile(gated, direct)
    rig.set_rules("allow id 0781:5567")
    times: dict[str, list[float]] = {"usbgate": [], "direct": []}
    cpu: list[float] = []
    assert rig.gateway is not None
    with rig.plug(gated, serial="GATE0001"):
        assert rig.guest.run("wait_stick 30").rc == 0
        with rig.plug(direct, direct=True, serial="DIRECT01"):
            ok = rig.guest.run("i=0; while [ ! -b /dev/sdb ] && [ $i -lt 600 ]; do "
                               "usleep 50000; i=$((i+1)); done; mkdir -p /mnt/g /mnt/d && "
                               "mount -o ro /dev/sda /mnt/g && mount -o ro /dev/sdb /mnt/d",
                               timeout=60)  # fmt: skip
            assert ok.rc == 0, ok.output
            for n in range(runs):
                order = ("usbgate", "direct") if n % 2 == 0 else ("direct", "usbgate")
                for path in order:
                    src = "/mnt/g" if path == "usbgate" else "/mnt/d"
                    rig.guest.run("sync; echo 3 > /proc/sys/vm/drop_caches")
                    start, cpu_start = time.perf_counter(), _cpu_seconds(rig.gateway.pid)
                    res = rig.guest.run(f"cp {src}/big.bin /tmp/copy && rm /tmp/copy",
                                        timeout=300)  # fmt: skip
                    times[path].append(time.perf_counter() - start)
                    if path == "usbgate":
                        cpu.append(_cpu_seconds(rig.gateway.pid) - cpu_start)
                    assert res.rc == 0, res.output
            rig.guest.run("umount /mnt/g; umount /mnt/d")
    rig.wait_gone()
    g, d = statistics.median(times["usbgate"]), statistics.median(times["direct"])
    return {"size_mib": size_mib, "runs": runs, "usbgate_s": summary(times["usbgate"], 1),
            "direct_s": summary(times["direct"], 1),
            "usbgate_mb_s": round(size_mib * MIB / g / 1e6, 1),
            "direct_mb_s": round(size_mib * MIB / d / 1e6, 1),
            "cost_percent": round((g - d) / d * 100, 2),
            "usbgate_cpu_s": summary(cpu, 1),
            "load_average": [round(x, 1) for x in os.getloadavg()]}  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- 2. control transfers ----------------------------------------------------------------------


def _read10_transfers(n: int) -> list[Packet]:
    """What the guest's usb-storage sends for one READ(10) of 240 blocks (120 KiB, its
    largest): the CBW on 0x02, the data read on 0x81, the CSW read on 0x81."""
    cdb = struct.pack(">BBIBHB", 0x28, 0, (n * 240) % 100_000, 0, 240, 0)
    cbw = CBW.pack(CBW_SIGNATURE, n, 240 * 512, 0x80, 0, len(cdb), cdb.ljust(16, b"\0"))
    return [BulkPacket(BULK_OUT, 0, len(cbw), data=cbw), BulkPacket(BULK_IN, 0, 240 * 512),
            BulkPacket(BULK_IN, 0, 13)]  # fmt: skip


async def _round_trips(via_gateway: bool, count: int, workdir: Path, *, bulk: bool
                       ) -> list[float]:  # fmt: skip
    """A usb-guest peer (QEMU's role) times `count` GET_DESCRIPTOR round trips, or (bulk)
    `count` whole READ(10) commands of 120 KiB (three bulk transfers each)."""
    qemu_sock = workdir / f"q{int(via_gateway)}.sock"
    ready: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(Role.GUEST)
        writer.write(conn.send(Hello("bench-qemu", (int(ALL_CAPABILITIES),))))

        async def next_packet() -> Any:
            while (event := conn.next_event()) is NEED_DATA:
                conn.receive_data(await reader.read(65536))
            return event

        while not isinstance(await next_packet(), DeviceConnect):
            pass
        rtts = []
        packet_id = 0
        for n in range(count + 20):
            start = time.perf_counter()
            requests: list[Packet] = (
                _read10_transfers(n) if bulk else [ControlPacket(0x80, 6, 0x80, 0, 0x100, 0, 18)]
            )
            for request in requests:
                packet_id += 1
                writer.write(conn.send(replace(request, id=packet_id)))
                while not isinstance(reply := await next_packet(), ControlPacket | BulkPacket):
                    pass
                assert reply.id == packet_id and reply.status == 0, reply
            rtts.append(time.perf_counter() - start)
        ready.set_result(rtts[20:])  # the first 20 warm up
        writer.close()

    server = await asyncio.start_unix_server(peer, str(qemu_sock))
    target = f"unix:{qemu_sock}"
    gateway = None
    if via_gateway:
        listen = workdir / f"g{count}.sock"
        gateway = Gateway("bench", parse_address(f"unix:{listen}"), [parse_address(target)],
                          MemoryRuleSource({"bench": [parse_rule("allow id *:*")]}),
                          MemoryAuditSink())  # fmt: skip
        await gateway.start()
        target = f"unix:{listen}"
    device = FakeDevice()
    if bulk:
        disk = ScsiDisk(MemoryStore(100_000 * 512 + 240 * 512))
        device = MassStorageStick(transport=BulkOnlyTransport(disk))
    owner = await FakeOwner.connect(target, device)
    try:
        return await asyncio.wait_for(ready, 60)
    finally:
        await owner.close()
        if gateway is not None:
            await gateway.stop()
        server.close()


def bench_transfers(count: int, workdir: Path, *, bulk: bool) -> dict[str, Any]:
    """Alternating direct and usbgate batches (noise on this shared machine hits both)."""
    direct: list[float] = []
    gated: list[float] = []
    for _ in range(5):
        direct += asyncio.run(_round_trips(False, count // 5, workdir, bulk=bulk))
        gated += asyncio.run(_round_trips(True, count // 5, workdir, bulk=bulk))
    return {"count": len(direct), "direct_us": summary(direct, 1e6),
            "usbgate_us": summary(gated, 1e6),
            "added_us": round((statistics.median(gated) - statistics.median(direct)) * 1e6, 1),
            }  # fmt: skip


# --- 3. revocation, 4. live allow ------------------------------------------------------------


def bench_revocation(rig: UsbRig, image: Path, runs: int) -> dict[str, Any]:
    latencies = []
    for _ in range(runs):
        rig.set_rules("allow id 0781:5567")
        with rig.plug(image):
            assert rig.guest.run("wait_stick 30").rc == 0
            rig.guest.send("read_until_fail")
            time.sleep(0.3)
            committed = rig.prepend_rule("block id 0781:5567")
            seen = rig.guest.wait_console("USB disconnect", committed - 1, timeout=20)
            res = rig.guest.result(timeout=60)
            assert "VMSHIELD-READ-FAILED" in res.output, res.output
            latencies.append(seen - committed)
        rig.wait_gone()
    return {"commit_to_guest_disconnect_ms": summary(latencies)}


def bench_live_allow(rig: UsbRig, image: Path, runs: int) -> dict[str, Any]:
    to_qemu, to_guest = [], []
    for _ in range(runs):
        rig.set_rules("block id 1111:*")
        denied = len(rig.audit("usb.denied"))
        with rig.plug(image):
            rig.wait_audit("usb.denied", denied + 1)
            committed = rig.prepend_rule("allow id 0781:5567")
            to_qemu.append(rig.wait_attached(True, 0) - committed)
            seen = rig.guest.wait_console("new high-speed USB device", committed, timeout=20)
            to_guest.append(seen - committed)
            assert rig.guest.run("wait_stick 30").rc == 0
        rig.wait_gone()
    return {"commit_to_qemu_attached_ms": summary(to_qemu),
            "commit_to_guest_enumerates_ms": summary(to_guest)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench usb", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--size", type=int, default=64, help="MiB copied per run (default: 64)")
    p.add_argument("--runs", type=int, default=20, help="runs of each measure (default: 20)")
    p.add_argument("--control", type=int, default=2000, help="control transfers (default 2000)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    measures = ("copy", "control", "revocation", "live-allow", "host", "host-pg")
    p.add_argument("--only", choices=measures, action="append",
                   help="run only these measures (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    if args.runs < 1 or args.size < 1:
        p.error("--runs and --size must be at least 1")
    wanted = set(args.only or ("copy", "control", "revocation", "live-allow", "host"))
    workdir = short_tmpdir()
    results: dict[str, Any] = {}
    try:
        if "control" in wanted:
            results["control"] = bench_transfers(args.control, workdir, bulk=False)
            print(f"control transfers: {json.dumps(results['control'])}", flush=True)
            results["read10"] = bench_transfers(args.control // 4, workdir, bulk=True)
            print(f"READ(10) of 120 KiB: {json.dumps(results['read10'])}", flush=True)
        if "host" in wanted:
            (workdir / "host").mkdir()
            results["host"] = bench_host(workdir / "host", args.runs)
            print(f"host: {json.dumps(results['host'])}", flush=True)
        if "host-pg" in wanted:
            (workdir / "host-pg").mkdir()
            results["host_pg"] = bench_host(workdir / "host-pg", args.runs, postgres=True)
            print(f"host on PostgreSQL: {json.dumps(results['host_pg'])}", flush=True)
        if wanted - {"control", "host", "host-pg"}:
            with UsbRig.started(workdir, memory=512) as rig:
                image = make_stick_image(workdir / "stick.img", {"data.bin": b"x" * MIB})
                if "copy" in wanted:
                    results["copy"] = bench_copy(rig, args.size, args.runs)
                    print(f"copy: {json.dumps(results['copy'])}", flush=True)
                if "revocation" in wanted:
                    results["revocation"] = bench_revocation(rig, image, args.runs)
                    print(f"revocation: {json.dumps(results['revocation'])}", flush=True)
                if "live-allow" in wanted:
                    results["live_allow"] = bench_live_allow(rig, image, args.runs)
                    print(f"live allow: {json.dumps(results['live_allow'])}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
