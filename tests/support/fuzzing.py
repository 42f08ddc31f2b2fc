"""A small, fast, reproducible mutation fuzzer for usbgate's parsers and sessions.

Every fuzz test draws its cases from ``random.Random(seed)`` and says the seed and the case
number when a case fails, so a failure is replayed with
``VMSHIELD_FUZZ_SEED=S VMSHIELD_FUZZ_CASES=N``. The suite runs a few thousand cases per target;
the long run is the same tests with ``VMSHIELD_FUZZ_CASES=1000000`` (cases per target).
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
from collections.abc import Callable, Iterator, Sequence

from usbgate.errors import ProtocolError
from usbgate.usbredir.packets import (
    PACKET_CLASSES,
    BufferedBulkPacket,
    BulkPacket,
    ControlPacket,
    DeviceConnect,
    EpInfo,
    FilterFilter,
    Hello,
    Interface,
    InterfaceInfo,
    InterruptPacket,
    IsoPacket,
    Packet,
)
from usbgate.usbredir.structs import FixedBody
from usbgate.usbredir.wire import Capability, Role

INTERESTING = (0, 1, 2, 7, 8, 9, 0x10, 0x12, 0x7F, 0x80, 0x81, 0xFE, 0xFF)


def case_count(default: int) -> int:
    """Cases per target: ``VMSHIELD_FUZZ_CASES`` when set (the long run), else ``default``."""
    return int(os.environ.get("VMSHIELD_FUZZ_CASES", default))


def seed() -> int:
    return int(os.environ.get("VMSHIELD_FUZZ_SEED", "20261201"))


def cases(default: int, salt: int, *, fixed: bool = False) -> Iterator[tuple[int, random.Random]]:
    """(case number, its own Random) for each case; one Random per case keeps replays exact.
    ``fixed``: always ``default`` cases (a property check, not a fuzz target of the long run)."""
    base = seed() * 1_000_003 + salt
    for n in range(default if fixed else case_count(default)):
        yield n, random.Random(base * 10_000_019 + n)


def where(n: int) -> str:
    return f"case {n} (replay: VMSHIELD_FUZZ_SEED={seed()} VMSHIELD_FUZZ_CASES={n + 1})"


def mutate(rng: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    """``data`` with 1-4 random edits: bit flips, interesting bytes, inserts, cuts, splices."""
    out = bytearray(data)
    for _ in range(rounds or rng.randint(1, 4)):
        choice = rng.randrange(8)
        pos = rng.randrange(len(out) + 1)
        if choice == 0 and out:
            out[pos % len(out)] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:
            out[pos % len(out)] = rng.choice(INTERESTING)
        elif choice == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif choice == 3 and out:
            del out[pos : pos + rng.randint(1, 16)]
        elif choice == 4:
            del out[pos:]
        elif choice == 5 and len(out) >= 2:
            pos = min(pos, len(out) - 2)
            struct.pack_into("<H", out, pos, rng.choice((0, 1, 0x7FFF, 0xFFFF, len(out))))
        elif choice == 6 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start : start + rng.randint(1, 32)]
        else:
            out += rng.randbytes(rng.randint(0, 4))
    return bytes(out)


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut into random pieces (sometimes one byte at a time)."""
    out, pos = [], 0
    if rng.random() < 0.05:  # byte by byte, for a while
        out, pos = [data[i : i + 1] for i in range(min(len(data), 64))], min(len(data), 64)
    while pos < len(data):
        size = rng.choice((1, 2, 3, 7, 12, 16, 64, 4096))
        out.append(data[pos : pos + size])
        pos += size
    return out


def _u(rng: random.Random, bits: int) -> int:
    if rng.random() < 0.3:
        return rng.choice(INTERESTING) & ((1 << bits) - 1)
    return rng.getrandbits(bits)


def _data_for(rng: random.Random, endpoint: int, sender: Role) -> bytes:
    carries = bool(endpoint & 0x80) == (sender is Role.HOST)
    return rng.randbytes(rng.choice((0, 1, 8, 18, 64, 300))) if carries else b""


def random_packet(rng: random.Random, sender: Role, caps: Capability, *,
                  often: type | None = None) -> Packet:  # fmt: skip
    """A valid packet that ``sender`` may send under ``caps`` (of any type it may send; every
    other one an ``often`` if given)."""
    while True:
        cls = often if often is not None and rng.random() < 0.5 else None
        cls = cls or rng.choice(list(PACKET_CLASSES.values()))
        if sender in cls.SENDERS and cls is not Hello:
            break
    ep = rng.choice((0x00, 0x80, 0x81, 0x02, 0x83, 0x04)) if rng.random() < 0.8 else _u(rng, 8)
    data = _data_for(rng, ep, sender)
    builders: dict[type, Callable[[], Packet]] = {
        DeviceConnect: lambda: DeviceConnect(
            *(_u(rng, 8) for _ in range(4)), _u(rng, 16), _u(rng, 16), _u(rng, 16)
        ),
        InterfaceInfo: lambda: InterfaceInfo(
            tuple(
                Interface(n, _u(rng, 8), _u(rng, 8), _u(rng, 8)) for n in range(rng.randint(0, 32))
            )
        ),
        EpInfo: lambda: EpInfo(
            *(tuple(_u(rng, 8) for _ in range(32)) for _ in range(3)),
            tuple(_u(rng, 16) for _ in range(32)),
            tuple(_u(rng, 32) for _ in range(32)),
        ),
        FilterFilter: lambda: FilterFilter("-1,0x0781,0x5567,-1,1|-1,-1,-1,-1,0"),
        ControlPacket: lambda: ControlPacket(
            ep, _u(rng, 8), _u(rng, 8), _u(rng, 8), _u(rng, 16), _u(rng, 16), len(data), data
        ),
        BulkPacket: lambda: BulkPacket(ep, _u(rng, 8), len(data), _u(rng, 32), data),
        IsoPacket: lambda: IsoPacket(ep, _u(rng, 8), len(data), data),
        InterruptPacket: lambda: InterruptPacket(ep, _u(rng, 8), len(data), data),
        BufferedBulkPacket: lambda: BufferedBulkPacket(
            _u(rng, 32), len(data := rng.randbytes(rng.randint(0, 64))), ep | 0x80, _u(rng, 8), data
        ),
    }
    if cls in builders:
        packet = builders[cls]()
    else:
        assert issubclass(cls, FixedBody)
        body = rng.randbytes(cls.WIRE.size)
        packet = cls.unpack(body, id=0, caps=caps, sender=sender)  # type: ignore[assignment]
    try:
        check = getattr(packet, "check", None)
        if check is not None:
            check(sender)
    except ProtocolError:
        return random_packet(rng, sender, caps)  # e.g. an iso packet in the wrong direction
    return dataclasses.replace(packet, id=_u(rng, 64 if caps & Capability.IDS_64BIT else 32))


def pick(rng: random.Random, items: Sequence[bytes]) -> bytes:
    return items[rng.randrange(len(items))]
