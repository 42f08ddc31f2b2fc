"""`python -m scripts.lab.bench.usb_relay`: usbgate's forwarding cost per packet, sans-IO.

One Relay with an attached, judged mass-storage stick; no socket, no event loop, no guest.
It pushes what a Linux guest's READ(10) of 120 KiB is made of through it: QEMU's CBW (bulk
OUT, 31 bytes), its two bulk IN requests (120 KiB and 13 bytes, no data), and the owner's
three replies (status, 120 KiB of data in READ_SIZE chunks, the CSW); every 16th command
also carries a GET_DESCRIPTOR control transfer (checked against its request). Reported: µs
of CPU per packet and packets/s, the best of --repeat runs (the machine is shared: CPU time,
not wall time); --profile: the cProfile of one run, the top 25 by tottime.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

from usbgate.addresses import READ_SIZE
from usbgate.relay import Relay
from usbgate.rules.policy import Action, Decision, Device
from usbgate.simulator import BULK_IN, BULK_OUT, FakeDevice
from usbgate.sources import MemoryAuditSink
from usbgate.usbredir.codec import Connection
from usbgate.usbredir.packets import BulkPacket, ControlPacket, Hello
from usbgate.usbredir.wire import ALL_CAPABILITIES, Role, Status

DATA = 240 * 512  # usb-storage's largest READ(10) on a high-speed device


def _allow(_device: Device) -> Decision:
    return Decision(Action.ALLOW, "bench")


def attached_relay() -> tuple[Relay, Connection, Connection]:
    """A relay whose stick has been probed and allowed, with its two peers' connections."""
    relay = Relay(vm="bench", slot=0, peer="bench", decide=_allow, audit=MemoryAuditSink())
    owner, qemu = Connection(Role.HOST), Connection(Role.GUEST)
    hello = Hello("bench", (int(ALL_CAPABILITIES),))
    relay.receive_owner(owner.send(hello))
    relay.receive_qemu(qemu.send(hello))
    owner.receive_packets(relay.take_owner_bytes())
    qemu.receive_packets(relay.take_qemu_bytes())
    device = FakeDevice()
    pending = owner.receive_packets(b"")
    relay.receive_owner(b"".join(owner.send(p) for p in (device.interface_info(),
                                 device.ep_info(), device.device_connect())))  # fmt: skip
    pending += owner.receive_packets(relay.take_owner_bytes())
    while pending:
        request = pending.pop(0)
        if isinstance(request, ControlPacket):
            data = (device.descriptor(request.value) or b"")[: request.length]
            relay.receive_owner(owner.send(ControlPacket(
                request.endpoint, request.request, request.requesttype, Status.SUCCESS,
                request.value, request.index, len(data), data, id=request.id)))  # fmt: skip
            pending += owner.receive_packets(relay.take_owner_bytes())
    qemu.receive_packets(relay.take_qemu_bytes())
    return relay, owner, qemu


def command_streams(owner: Connection, qemu: Connection, n: int) -> list[tuple[bytes, bytes]]:
    """(QEMU's bytes, the owner's bytes) for each transfer of ``n`` READ(10) commands."""
    cbw = b"USBC" + bytes(27)
    data = bytes(range(256)) * (DATA // 256)
    csw = b"USBS" + bytes(9)
    device = FakeDevice()
    out: list[tuple[bytes, bytes]] = []
    ids = 0
    for i in range(n):
        ids += 3
        out += [
            (qemu.send(BulkPacket(BULK_OUT, 0, 31, data=cbw, id=ids)),
             owner.send(BulkPacket(BULK_OUT, 0, 31, id=ids))),
            (qemu.send(BulkPacket(BULK_IN, 0, DATA, id=ids + 1)),
             owner.send(BulkPacket(BULK_IN, 0, DATA, data=data, id=ids + 1))),
            (qemu.send(BulkPacket(BULK_IN, 0, 13, id=ids + 2)),
             owner.send(BulkPacket(BULK_IN, 0, 13, data=csw, id=ids + 2))),
        ]  # fmt: skip
        if i % 16 == 0:
            asked = ControlPacket(0x80, 6, 0x80, 0, 0x100, 0, 18, id=ids + 3)
            reply = ControlPacket(0x80, 6, 0x80, 0, 0x100, 0, 18, device.device_descriptor(),
                                  id=ids + 3)  # fmt: skip
            out.append((qemu.send(asked), owner.send(reply)))
            ids += 1
    return out


def run(streams: list[tuple[bytes, bytes]], relay: Relay) -> tuple[int, int]:
    """Feed every transfer (QEMU's request, then the owner's reply in READ_SIZE chunks);
    returns (bytes out to QEMU, bytes out to the owner)."""
    to_qemu = to_owner = 0
    for request, reply in streams:
        relay.receive_qemu(request)
        to_owner += len(relay.take_owner_bytes())
        for start in range(0, len(reply), READ_SIZE):
            relay.receive_owner(reply[start : start + READ_SIZE])
        to_qemu += len(relay.take_qemu_bytes())
    return to_qemu, to_owner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.lab.bench.usb_relay", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--commands", type=int, default=2000, help="READ(10) commands")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25")
    args = parser.parse_args(argv)
    best = None
    for _ in range(args.repeat):
        relay, owner, qemu = attached_relay()
        streams = command_streams(owner, qemu, args.commands)
        expected = sum(len(r) for _, r in streams), sum(len(q) for q, _ in streams)
        profiler = cProfile.Profile() if args.profile else None
        start = time.process_time_ns()
        if profiler is not None:
            profiler.enable()
        moved = run(streams, relay)
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        elapsed = time.process_time_ns() - start
        if moved != expected or relay.closed:
            print(f"relay did not forward everything: {moved} of {expected}", file=sys.stderr)
            return 1
        best = elapsed if best is None else min(best, elapsed)
    assert best is not None
    packets = 2 * len(streams)
    print(f"{args.commands} READ(10) commands, {packets} packets, {sum(moved) / 2**20:.0f} MiB, "
          f"best of {args.repeat}: {best / 1000 / packets:.2f} us of CPU/packet, "
          f"{packets / best * 1e9:,.0f} packets/s, {sum(moved) / best * 1e3:.0f} MB/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
