"""The sans-IO usbredir codec: round trips of every packet type, bytes fed whole, byte by byte
and with trailing garbage, capability-dependent layouts, malformed input, and a fuzz run."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usbgate.errors import ProtocolError
from usbgate.usbredir.codec import CLOSED, NEED_DATA, Connection, Event
from usbgate.usbredir.packets import (
    PACKET_CLASSES,
    AllocBulkStreams,
    AltSettingStatus,
    BufferedBulkPacket,
    BulkPacket,
    BulkReceivingStatus,
    BulkStreamsStatus,
    CancelDataPacket,
    ConfigurationStatus,
    ControlPacket,
    DeviceConnect,
    DeviceDisconnect,
    DeviceDisconnectAck,
    EpInfo,
    FilterFilter,
    FilterReject,
    FreeBulkStreams,
    GetAltSetting,
    GetConfiguration,
    Hello,
    Interface,
    InterfaceInfo,
    InterruptPacket,
    InterruptReceivingStatus,
    IsoPacket,
    IsoStreamStatus,
    Packet,
    Reset,
    SetAltSetting,
    SetConfiguration,
    StartBulkReceiving,
    StartInterruptReceiving,
    StartIsoStream,
    StopBulkReceiving,
    StopInterruptReceiving,
    StopIsoStream,
)
from usbgate.usbredir.wire import ALL_CAPABILITIES, Capability, PacketType, Role

# Bytes QEMU 7.2 sent to a fake owner on this machine: its hello (caps 0xff), then, after the
# device was announced, two resets, three GET_DESCRIPTOR control packets and a
# set_configuration, all with 16-byte headers (both sides announced 64bits_ids).
QEMU_CAPTURE = bytes.fromhex(
    "00000000440000000000000071656d75207573622d726564697220677565737420372e322e323200"
    "000000000000000000000000000000000000000000000000000000000000000000000000ff000000"
    "0300000000000000000000000000000003000000000000000000000000000000640000000a000000"
    "00f8fd030000000080068042000100000800640000000a00000030f8fd0300000000800680440002"
    "00000900640000000a00000060f8fd030000000080068044000200001900060000000100000090f8"
    "fd030000000001"
)

ZERO32 = (0,) * 32

# Every packet type, each with the role that may send it.
HOST_PACKETS: list[Packet] = [
    DeviceConnect(2, 0, 0, 0, 0x0781, 0x5567, 0x0100),
    DeviceDisconnect(),
    InterfaceInfo((Interface(0, 8, 6, 0x50), Interface(1, 3, 1, 1))),
    EpInfo(tuple(range(32)), tuple(range(32)), ZERO32, tuple(range(0, 64, 2)), tuple(range(32))),
    ConfigurationStatus(0, 1, id=7),
    AltSettingStatus(0, 1, 2, id=8),
    IsoStreamStatus(4, 0x81, id=9),
    InterruptReceivingStatus(0, 0x83, id=10),
    BulkStreamsStatus(0x6, 16, 0, id=11),
    BulkReceivingStatus(1, 0x82, 0, id=12),
    ControlPacket(0x80, 6, 0x80, 0, 0x0100, 0, 4, b"\x12\x01\x00\x02", id=13),
    BulkPacket(0x82, 0, 70000, 3, b"x" * 70000, id=14),
    IsoPacket(0x81, 0, 3, b"abc", id=15),
    InterruptPacket(0x83, 0, 2, b"hi", id=16),
    BufferedBulkPacket(1, 4, 0x82, 0, b"data", id=17),
    FilterFilter("-1,0x0781,0x5567,-1,1|-1,-1,-1,-1,0"),
]
GUEST_PACKETS: list[Packet] = [
    Reset(),
    SetConfiguration(1, id=1),
    GetConfiguration(id=2),
    SetAltSetting(0, 1, id=3),
    GetAltSetting(0, id=4),
    StartIsoStream(0x81, 8, 4, id=5),
    StopIsoStream(0x81, id=6),
    StartInterruptReceiving(0x83, id=7),
    StopInterruptReceiving(0x83, id=8),
    AllocBulkStreams(0x6, 16, id=9),
    FreeBulkStreams(0x6, id=10),
    CancelDataPacket(id=11),
    FilterReject(),
    DeviceDisconnectAck(),
    StartBulkReceiving(1, 4096, 0x82, 4, id=12),
    StopBulkReceiving(1, 0x82, id=13),
    ControlPacket(0x00, 9, 0x00, 0, 1, 0, 2, b"\x01\x02", id=2**40),
    BulkPacket(0x02, 0, 5, 0, b"hello", id=15),
    IsoPacket(0x01, 0, 1, b"z", id=16),
    InterruptPacket(0x03, 0, 1, b"k", id=17),
    FilterFilter("-1,-1,-1,-1,1"),
]


def test_every_packet_type_has_a_sample() -> None:
    covered = {p.TYPE for p in HOST_PACKETS + GUEST_PACKETS} | {PacketType.HELLO}
    assert covered == set(PacketType) == set(PACKET_CLASSES)


def pair(caps: Capability = ALL_CAPABILITIES) -> tuple[Connection, Connection, bytes]:
    """A host and a guest connection after exchanging hellos; returns the guest's hello bytes
    (already fed to the host) and leaves the host's hello unread by the guest."""
    host, guest = Connection(Role.HOST), Connection(Role.GUEST)
    host_hello = host.send(Hello("host 1", (int(caps),)))
    host.receive_data(guest.send(Hello("guest 1", (int(caps),))))
    assert isinstance(host.next_event(), Hello)
    return host, guest, host_hello


def drain(conn: Connection) -> list[Event]:
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if event is CLOSED:
            break
    return events


def feed(conn: Connection, data: bytes, mode: str) -> list[Event]:
    events: list[Event] = []
    if mode == "whole":
        conn.receive_data(data)
        events += drain(conn)
    else:
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1])
            events += drain(conn)
    return events


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("caps", [ALL_CAPABILITIES, Capability(0)], ids=["caps-ff", "caps-0"])
def test_host_packets_round_trip(mode: str, caps: Capability) -> None:
    host, guest, stream = pair(caps)
    samples = [p for p in HOST_PACKETS if caps or _fits_without_caps(p)]
    for packet in samples:
        stream += host.send(packet)
    events = feed(guest, stream, mode if len(stream) < 20000 else "whole")
    assert isinstance(events[0], Hello)
    assert events[1:] == [_as_received(p, caps) for p in samples]


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_guest_packets_round_trip(mode: str) -> None:
    host, guest, host_hello = pair()
    guest.receive_data(host_hello)
    assert isinstance(guest.next_event(), Hello)
    stream = b"".join(guest.send(p) for p in GUEST_PACKETS)
    assert feed(host, stream, mode) == GUEST_PACKETS


def _fits_without_caps(p: Packet) -> bool:
    return not (isinstance(p, BulkPacket) and p.length > 0xFFFF)


def _as_received(p: Packet, caps: Capability) -> Packet:
    """What survives a trip without the capabilities that carry optional fields."""
    if isinstance(p, DeviceConnect) and not caps & Capability.CONNECT_DEVICE_VERSION:
        return dataclasses.replace(p, device_version_bcd=0)
    if isinstance(p, EpInfo) and not caps:
        return EpInfo(p.types, p.intervals, p.interfaces, id=p.id)
    return p


def test_header_is_16_bytes_only_when_both_sides_have_64bit_ids() -> None:
    host, _, _ = pair(ALL_CAPABILITIES)
    assert len(host.send(DeviceDisconnect())) == 16
    host, _, _ = pair(ALL_CAPABILITIES & ~Capability.IDS_64BIT)
    assert len(host.send(DeviceDisconnect())) == 12
    one_sided = Connection(Role.HOST)
    one_sided.send(Hello("h", (0xFF,)))
    one_sided.receive_data(Connection(Role.GUEST).send(Hello("g", (0x1F,))))
    one_sided.next_event()
    assert len(one_sided.send(DeviceDisconnect())) == 12


def test_capability_dependent_layouts() -> None:
    connect = DeviceConnect(2, 0, 0, 0, 1, 2, 3)
    assert len(connect.pack(ALL_CAPABILITIES)) == 10
    assert len(connect.pack(Capability(0))) == 8
    ep = EpInfo(ZERO32)
    assert len(ep.pack(Capability(0))) == 96
    assert len(ep.pack(Capability.EP_INFO_MAX_PACKET_SIZE)) == 160
    assert len(ep.pack(ALL_CAPABILITIES)) == 288
    assert len(BulkPacket(2, 0, 0).pack(Capability.BULK_LENGTH_32BIT)) == 10
    with pytest.raises(ValueError, match="32bits_bulk_length"):
        BulkPacket(2, 0, 70000, data=b"x" * 70000).pack(Capability(0))


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_real_qemu_capture(mode: str) -> None:
    owner = Connection(Role.HOST)
    owner.send(Hello("fake-owner 1.0", (0xFF,)))
    events = feed(owner, QEMU_CAPTURE, mode)
    hello = events[0]
    assert isinstance(hello, Hello) and hello.version == "qemu usb-redir guest 7.2.22"
    assert [type(e).__name__ for e in events[1:]] == [
        "Reset", "Reset", "ControlPacket", "ControlPacket", "ControlPacket", "SetConfiguration",
    ]  # fmt: skip
    first = events[3]
    assert isinstance(first, ControlPacket)
    assert (first.request, first.value, first.length) == (6, 0x0100, 8)
    assert first.status == 0x42  # QEMU leaves the reply-only status field uninitialised


def test_trailing_garbage_after_complete_packets() -> None:
    owner = Connection(Role.HOST)
    owner.send(Hello("o", (0xFF,)))
    owner.receive_data(QEMU_CAPTURE + b"\xde\xad\xbe\xef" * 5)
    events = []
    with pytest.raises(ProtocolError, match="unknown packet type"):
        while True:
            events.append(owner.next_event())
    assert len(events) == 7  # every real packet came out before the garbage was refused
    with pytest.raises(ProtocolError):
        owner.next_event()  # a failed connection stays failed


def test_short_trailing_garbage_waits_then_fails_at_eof() -> None:
    owner = Connection(Role.HOST)
    owner.send(Hello("o", (0xFF,)))
    owner.receive_data(QEMU_CAPTURE + b"\x01\x02")
    assert len(drain(owner)) == 7
    owner.receive_data(b"")
    with pytest.raises(ProtocolError, match="ends inside a packet"):
        owner.next_event()


def test_clean_eof_is_closed() -> None:
    _, guest, stream = pair()
    guest.receive_data(stream)
    guest.receive_data(b"")
    assert isinstance(guest.next_event(), Hello)
    assert guest.next_event() is CLOSED


def _guest_after_hellos(caps: int = 0xFF) -> Connection:
    guest = Connection(Role.GUEST)
    guest.send(Hello("g", (caps,)))
    guest.receive_data(Connection(Role.HOST).send(Hello("h", (caps,))))
    assert isinstance(guest.next_event(), Hello)
    return guest


def _raw(ptype: int, body: bytes, id_: int = 0) -> bytes:
    return struct.pack("<IIQ", ptype, len(body), id_) + body


@pytest.mark.parametrize(
    ("ptype", "body", "message"),
    [
        (PacketType.DEVICE_CONNECT, b"\0" * 9, "DEVICE_CONNECT"),
        (PacketType.INTERFACE_INFO, struct.pack("<I", 33) + b"\0" * 128, "interface_count"),
        (PacketType.EP_INFO, b"\0" * 96, "EP_INFO"),
        (PacketType.CONFIGURATION_STATUS, b"\0", "body is 1 bytes"),
        (PacketType.DEVICE_DISCONNECT, b"\0", "body is 1 bytes"),
        (PacketType.FILTER_FILTER, b"-1,-1,-1,-1,1", "0-terminated"),
        (PacketType.FILTER_FILTER, b"a\0b\0", "0-terminated"),
        (PacketType.CONTROL_PACKET, b"\0" * 5, "header needs"),
        (
            PacketType.CONTROL_PACKET,
            bytes([0x80, 6, 0x80, 0]) + struct.pack("<HHH", 0, 0, 4) + b"ab",
            "length field says 4",
        ),
        (
            PacketType.CONTROL_PACKET,
            bytes([0x00, 9, 0, 0]) + struct.pack("<HHH", 0, 0, 2) + b"ab",
            "wrong direction",
        ),
        (PacketType.ISO_PACKET, bytes([0x01, 0]) + struct.pack("<H", 0), "wrong direction"),
        (PacketType.BUFFERED_BULK_PACKET, struct.pack("<IIBB", 0, 9, 0x82, 0), "differs"),
        (PacketType.RESET, b"", "never sends RESET"),
        (PacketType.HELLO, b"\0" * 68, "second hello"),
        (77, b"", "unknown packet type 77"),
    ],
)
def test_malformed_packets_from_the_host(ptype: int, body: bytes, message: str) -> None:
    guest = _guest_after_hellos()
    guest.receive_data(_raw(ptype, body))
    with pytest.raises(ProtocolError, match=message):
        guest.next_event()


def test_first_packet_must_be_hello() -> None:
    guest = Connection(Role.GUEST)
    guest.receive_data(struct.pack("<III", PacketType.DEVICE_DISCONNECT, 0, 0))
    with pytest.raises(ProtocolError, match="not hello"):
        guest.next_event()


def test_bad_hello_lengths() -> None:
    for body in (b"\0" * 10, b"\0" * 66, b"\0" * (64 + 4 * 17)):
        guest = Connection(Role.GUEST)
        guest.receive_data(struct.pack("<III", 0, len(body), 0) + body)
        with pytest.raises(ProtocolError, match="HELLO"):
            guest.next_event()


def test_oversized_length_fails_before_the_body_arrives() -> None:
    guest = _guest_after_hellos()
    guest.max_body = 1024
    guest.receive_data(struct.pack("<IIQ", PacketType.BULK_PACKET, 1 << 30, 1))
    with pytest.raises(ProtocolError, match="exceeds limit"):
        guest.next_event()


def test_receive_buffer_is_bounded() -> None:
    guest = Connection(Role.GUEST, max_body=1024)
    guest.receive_data(Connection(Role.HOST).send(Hello("h", (0xFF,))))
    # our own hello is never sent, so nothing after the peer's hello can be parsed
    with pytest.raises(ProtocolError, match="more than one maximal packet"):
        for _ in range(100):
            guest.receive_data(b"\0" * 8192)


def test_packets_wait_for_our_hello() -> None:
    guest = Connection(Role.GUEST)
    host = Connection(Role.HOST)
    host.receive_data(Connection(Role.GUEST).send(Hello("x", (0xFF,))))
    stream = host.send(Hello("h", (0xFF,)))
    host.next_event()
    stream += host.send(DeviceDisconnect())
    guest.receive_data(stream)
    assert isinstance(guest.next_event(), Hello)
    assert guest.next_event() is NEED_DATA  # header size unknown until we said hello
    guest.send(Hello("g", (0xFF,)))
    assert guest.next_event() == DeviceDisconnect()


def test_send_refuses_what_the_role_never_sends() -> None:
    host, _, _ = pair()
    with pytest.raises(ValueError, match="never sends"):
        host.send(Reset())
    with pytest.raises(ValueError, match="wrong direction"):
        host.send(ControlPacket(0x00, 0, 0, 0, 0, 0, 1, b"x"))
    with pytest.raises(ValueError, match="before both hellos"):
        Connection(Role.HOST).send(Reset())


# --- fuzzing ----------------------------------------------------------------------------


def _valid_host_stream() -> bytes:
    """A host's hello followed by real packets, as a guest would receive them."""
    host = Connection(Role.HOST)
    stream = host.send(Hello("h", (0xFF,)))
    host.receive_data(Connection(Role.GUEST).send(Hello("g", (0xFF,))))
    host.next_event()
    return stream + b"".join(host.send(p) for p in HOST_PACKETS[:11])


VALID_HOST_STREAM = _valid_host_stream()


def _consume(data: bytes, chunk: int) -> None:
    guest = Connection(Role.GUEST, max_body=1 << 16)
    guest.send(Hello("g", (0xFF,)))
    try:
        for i in range(0, len(data), chunk):
            guest.receive_data(data[i : i + chunk])
            drain(guest)
        guest.receive_data(b"")
        drain(guest)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_fuzz_random_bytes_only_raise_protocol_error(data: bytes, chunk: int) -> None:
    _consume(VALID_HOST_STREAM[:80] + data, chunk)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID_HOST_STREAM) - 1), st.integers(0, 255)),
             max_size=8),
    st.integers(min_value=0, max_value=len(VALID_HOST_STREAM)),
    st.integers(min_value=1, max_value=97),
)  # fmt: skip
def test_fuzz_mutated_real_stream(flips: list[tuple[int, int]], cut: int, chunk: int) -> None:
    data = bytearray(VALID_HOST_STREAM)
    for pos, value in flips:
        data[pos] = value
    _consume(bytes(data[:cut]), chunk)


def test_usbgate_errors_are_vmshield_errors() -> None:
    """One product hierarchy: usbgate's errors derive from nbd_plugin.errors.VmshieldError."""
    from nbd_plugin.errors import VmshieldError
    from usbgate.errors import ProtocolError, RuleSourceError, RuleSyntaxError, UsbgateError
    from usbgate.probe import Contradiction, ProbeFailed
    from usbgate.usbredir.descriptors import DescriptorError

    for cls in (UsbgateError, ProtocolError, RuleSyntaxError, RuleSourceError, ProbeFailed,
                Contradiction, DescriptorError):  # fmt: skip
        assert issubclass(cls, VmshieldError), cls
