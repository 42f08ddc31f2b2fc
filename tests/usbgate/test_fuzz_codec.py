"""Fuzzing the usbredir codec: every packet type, mutated, fed whole, in pieces and byte by byte.

A case is a peer's stream (its hello, then random valid packets of every type it may send,
under random capabilities), usually mutated, fed to a ``Connection`` in random chunks, then
closed. The only exception allowed is ``ProtocolError``, after which the connection stays
dead; an unmutated stream must decode to exactly the packets sent, and re-encode to the same
bytes. Long run: ``VMSHIELD_FUZZ_CASES=1000000 .venv/bin/python -m pytest
tests/usbgate/test_fuzz_codec.py``.
"""

from __future__ import annotations

import random

from tests.support.fuzzing import cases, chunks, mutate, random_packet, where
from usbgate.errors import ProtocolError
from usbgate.usbredir.codec import Connection, Event, Frame, Sentinel, encode
from usbgate.usbredir.packets import BulkPacket, Hello, Packet
from usbgate.usbredir.wire import Capability, Role

CASES = 20_000
FRAME_CASES = 5_000


def random_caps(rng: random.Random) -> Capability:
    return Capability(rng.choice((0xFF, 0xFF, 0x00, 0xDF, 0x7F, rng.getrandbits(8))))


def peer_stream(rng: random.Random, often: type | None = None
                ) -> tuple[Connection, list[Packet], bytes]:  # fmt: skip
    ours = rng.choice((Role.HOST, Role.GUEST))
    conn = Connection(ours, max_body=rng.choice((4 * 1024 * 1024, 1024)))
    our_caps, peer_caps = random_caps(rng), random_caps(rng)
    conn.send(Hello("us", (int(our_caps),)))
    caps, peer = our_caps & peer_caps, ours.other
    ids64 = bool(caps & Capability.IDS_64BIT)
    hello = Hello("peer " + "x" * rng.randint(0, 58), (int(peer_caps),) * rng.randint(1, 3))
    packets = [random_packet(rng, peer, caps, often=often) for _ in range(rng.randint(0, 6))]
    wire = encode(hello, caps=Capability(0), sender=peer, ids_64bit=False)
    wire += b"".join(encode(p, caps=caps, sender=peer, ids_64bit=ids64) for p in packets)
    return conn, [hello, *packets], wire


def reencoded(conn: Connection, packets: list[Packet]) -> bytes:
    """The bytes ``packets`` (decoded by ``conn``) were sent as: the wire form is canonical."""
    caps = conn.caps or Capability(0)
    return b"".join(
        encode(p, caps=Capability(0) if isinstance(p, Hello) else caps, sender=conn.peer_role,
               ids_64bit=conn.ids_64bit and not isinstance(p, Hello))
        for p in packets
    )  # fmt: skip


def drain(conn: Connection) -> tuple[list[Event], bool]:
    """Every event buffered; True once the connection has failed."""
    out: list[Event] = []
    try:
        while (event := conn.next_event()) is not Sentinel.NEED_DATA:
            out.append(event)
            if event is Sentinel.CLOSED:
                break
    except ProtocolError:
        return out, True
    return out, False


def feed(rng: random.Random, conn: Connection, wire: bytes) -> tuple[list[Event], bool]:
    events: list[Event] = []
    for piece in [*chunks(rng, wire), b""]:
        try:
            conn.receive_data(piece)
        except ProtocolError:
            return events, True
        new, failed = drain(conn)
        events += new
        if failed:
            return events, True
    return events, False


def test_fuzz_codec_every_packet_type() -> None:
    decoded = failed = total = 0
    for n, rng in cases(CASES, salt=1):
        total += 1
        conn, sent, wire = peer_stream(rng)
        mutated = rng.random() < 0.85
        data = mutate(rng, wire) if mutated else wire
        try:
            events, dead = feed(rng, conn, data)
        except Exception as exc:
            raise AssertionError(f"{where(n)}: {type(exc).__name__}: {exc}") from exc
        if dead:
            failed += 1
            try:
                conn.next_event()
            except ProtocolError:
                pass
            else:
                raise AssertionError(f"{where(n)}: a failed connection went on")
            continue
        packets = [e for e in events if not isinstance(e, Sentinel)]
        decoded += len(packets)
        if not mutated:
            assert reencoded(conn, packets) == wire, where(n)
            assert len(packets) == len(sent) and events[-1] is Sentinel.CLOSED, where(n)
    print(f"\ncodec fuzz: {total} cases, {decoded} packets decoded, "
          f"{failed} streams refused with ProtocolError")  # fmt: skip
    assert decoded and failed  # both paths were exercised


def test_every_packet_type_round_trips_whole_and_byte_by_byte() -> None:
    """h11 test_io style on generated streams: same events whole, byte by byte, in chunks."""
    for n, rng in cases(500, salt=2, fixed=True):
        stream_seed = rng.getrandbits(64)
        _, sent, wire = peer_stream(random.Random(stream_seed))
        results = []
        for pieces in ([wire], [wire[i : i + 1] for i in range(len(wire))], chunks(rng, wire)):
            conn, _, _ = peer_stream(random.Random(stream_seed))  # the same roles and caps
            events: list[Event] = []
            for piece in [*pieces, b""]:
                conn.receive_data(piece)
                events += drain(conn)[0]
            results.append(events)
        assert results[0] == results[1] == results[2], where(n)
        assert reencoded(conn, [e for e in results[0] if not isinstance(e, Sentinel)]) == wire
        assert len(sent) == len(results[0]) - 1, where(n)


def frames_or_error(conn: Connection, wire: bytes, *, frames: bool) -> list[object]:
    """Every event of ``wire`` fed whole (bulk packets as Frames if ``frames``), ending with
    the ProtocolError's message if the stream was refused."""
    out: list[object] = []
    try:
        conn.receive_data(wire)
        conn.receive_data(b"")
        while (event := conn.next_frame(frames=frames)) not in (Sentinel.NEED_DATA,
                                                                  Sentinel.CLOSED):  # fmt: skip
            out.append(event)
    except ProtocolError as exc:
        out.append(str(exc))
    return out


def test_fuzz_frames_are_checked_as_decoded_bulk_packets_are() -> None:
    """What usbgate forwards without decoding (a Frame) is what decoding would have let through,
    byte for byte, and a stream decoding refuses is refused at the same packet, same reason."""
    frames = 0
    for n, rng in cases(FRAME_CASES, salt=3):
        stream_seed = rng.getrandbits(64)
        conn, _, wire = peer_stream(random.Random(stream_seed), BulkPacket)
        if rng.random() < 0.7:
            wire = mutate(rng, wire)
        decoded = frames_or_error(conn, wire, frames=False)
        conn, _, _ = peer_stream(random.Random(stream_seed), BulkPacket)
        framed = frames_or_error(conn, wire, frames=True)
        assert len(decoded) == len(framed), where(n)
        for packet, frame in zip(decoded, framed, strict=True):
            if not isinstance(frame, Frame):
                assert frame == packet, where(n)
                continue
            frames += 1
            assert isinstance(packet, BulkPacket) and frame.id == packet.id, where(n)
            assert frame.raw == encode(
                packet,
                caps=conn.caps or Capability(0),
                sender=conn.peer_role,
                ids_64bit=conn.ids_64bit,
            ), where(n)
    print(f"\nframe fuzz: {frames} bulk packets forwarded as frames")
    assert frames
