"""usbredir data packets: control, bulk, iso, interrupt and buffered bulk transfers.

"Note that the length should only be added to usb_redir_header.length in one direction (and the
actual packet length should match)." Data flows guest->host for OUT endpoints (bit 7 clear) and
host->guest for IN endpoints; the other direction carries no data. This is the check
usbredirparser's ``usbredirparser_verify_type_header`` makes, done here in ``_check_data``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from usbgate.errors import ProtocolError
from usbgate.usbredir.structs import EITHER, HOST_ONLY, pack_struct
from usbgate.usbredir.wire import Capability, PacketType, Role

ENDPOINT_DIR_IN = 0x80


def _data_expected(endpoint: int, sender: Role) -> bool:
    """True when a packet for ``endpoint`` sent by ``sender`` carries the transfer data."""
    is_in = bool(endpoint & ENDPOINT_DIR_IN)
    return is_in if sender is Role.HOST else not is_in


def _check_data(name: str, endpoint: int, length: int, data_length: int, sender: Role) -> None:
    if _data_expected(endpoint, sender):
        if data_length != length:
            raise ProtocolError(f"{name}: {data_length} data bytes but length field says {length}")
    elif data_length:
        raise ProtocolError(f"{name}: data in the wrong direction (endpoint {endpoint:#04x})")


def _split(name: str, wire: struct.Struct, body: bytes) -> tuple[tuple[int, ...], bytes]:
    if len(body) < wire.size:
        raise ProtocolError(f"{name}: body is {len(body)} bytes, header needs {wire.size}")
    return wire.unpack_from(body), body[wire.size :]


@dataclass(frozen=True)
class ControlPacket:
    """struct usb_redir_control_packet_header { uint8_t endpoint, request, requesttype, status;
    uint16_t value, index, length; } + data."""

    TYPE: ClassVar[PacketType] = PacketType.CONTROL_PACKET
    SENDERS: ClassVar[frozenset[Role]] = EITHER
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BBBBHHH")

    endpoint: int
    request: int
    requesttype: int
    status: int
    value: int
    index: int
    length: int
    data: bytes = b""
    id: int = 0

    def check(self, sender: Role) -> None:
        _check_data("CONTROL_PACKET", self.endpoint, self.length, len(self.data), sender)

    def pack(self, caps: Capability) -> bytes:
        head = (self.endpoint, self.request, self.requesttype, self.status)
        return pack_struct(self.WIRE, *head, self.value, self.index, self.length) + self.data

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        (endpoint, request, requesttype, status, value, index, length), data = _split(
            "CONTROL_PACKET", cls.WIRE, body
        )
        packet = cls(endpoint, request, requesttype, status, value, index, length, data, id=id)
        packet.check(sender)
        return packet


@dataclass(frozen=True)
class BulkPacket:
    """struct usb_redir_bulk_packet_header { uint8_t endpoint, status; uint16_t length;
    uint32_t stream_id; uint16_t length_high (cap 32bits_bulk_length); } + data.
    ``length`` here is the whole length (low and high halves joined)."""

    TYPE: ClassVar[PacketType] = PacketType.BULK_PACKET
    SENDERS: ClassVar[frozenset[Role]] = EITHER
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BBHI")
    WIRE_32: ClassVar[struct.Struct] = struct.Struct("<BBHIH")

    endpoint: int
    status: int
    length: int
    stream_id: int = 0
    data: bytes = b""
    id: int = 0

    def check(self, sender: Role) -> None:
        _check_data("BULK_PACKET", self.endpoint, self.length, len(self.data), sender)

    def pack(self, caps: Capability) -> bytes:
        low, high = self.length & 0xFFFF, self.length >> 16
        if caps & Capability.BULK_LENGTH_32BIT:
            head = pack_struct(self.WIRE_32, self.endpoint, self.status, low, self.stream_id, high)
        elif high:
            raise ValueError("bulk length > 65535 needs the 32bits_bulk_length capability")
        else:
            head = pack_struct(self.WIRE, self.endpoint, self.status, low, self.stream_id)
        return head + self.data

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        if caps & Capability.BULK_LENGTH_32BIT:
            wire = cls.WIRE_32
            (endpoint, status, low, stream_id, high), data = _split("BULK_PACKET", wire, body)
        else:
            (endpoint, status, low, stream_id), data = _split("BULK_PACKET", cls.WIRE, body)
            high = 0
        packet = cls(endpoint, status, low | high << 16, stream_id, data, id=id)
        packet.check(sender)
        return packet

    @classmethod
    def check_frame(cls, frame: bytes | bytearray, start: int, end: int, *, caps: Capability,
                    sender: Role) -> None:  # fmt: skip
        """Make the checks ``unpack`` makes on the body ``frame[start:end]``, without decoding
        it (usbgate forwards such a bulk packet's bytes unchanged); ProtocolError if bad."""
        wire = cls.WIRE_32 if caps & Capability.BULK_LENGTH_32BIT else cls.WIRE
        if end - start < wire.size:
            raise ProtocolError(
                f"BULK_PACKET: body is {end - start} bytes, header needs {wire.size}"
            )
        fields = wire.unpack_from(frame, start)
        length = fields[2] | (fields[4] << 16 if len(fields) == 5 else 0)
        _check_data("BULK_PACKET", fields[0], length, end - start - wire.size, sender)


@dataclass(frozen=True)
class _ShortDataPacket:
    """The layout iso and interrupt packets share: { uint8_t endpoint, status; uint16_t length; }
    + data. Subclasses set TYPE and say in ``check`` which direction they may be sent in."""

    TYPE: ClassVar[PacketType]
    SENDERS: ClassVar[frozenset[Role]] = EITHER
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BBH")

    endpoint: int
    status: int
    length: int
    data: bytes = b""
    id: int = 0

    def check(self, sender: Role) -> None:
        _check_data(self.TYPE.name, self.endpoint, self.length, len(self.data), sender)

    def pack(self, caps: Capability) -> bytes:
        return pack_struct(self.WIRE, self.endpoint, self.status, self.length) + self.data

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        (endpoint, status, length), data = _split(cls.TYPE.name, cls.WIRE, body)
        packet = cls(endpoint, status, length, data, id=id)
        packet.check(sender)
        return packet


@dataclass(frozen=True)
class IsoPacket(_ShortDataPacket):
    """struct usb_redir_iso_packet_header { uint8_t endpoint, status; uint16_t length; } + data.
    Iso packets always carry data: sent in the data's direction only."""

    TYPE: ClassVar[PacketType] = PacketType.ISO_PACKET

    def check(self, sender: Role) -> None:
        if not _data_expected(self.endpoint, sender):
            raise ProtocolError("ISO_PACKET: sent in the wrong direction")
        super().check(sender)


@dataclass(frozen=True)
class InterruptPacket(_ShortDataPacket):
    """struct usb_redir_interrupt_packet_header { uint8_t endpoint, status; uint16_t length; }
    + data. The guest never sends one for an IN endpoint (the host polls those)."""

    TYPE: ClassVar[PacketType] = PacketType.INTERRUPT_PACKET

    def check(self, sender: Role) -> None:
        if sender is Role.GUEST and self.endpoint & ENDPOINT_DIR_IN:
            raise ProtocolError("INTERRUPT_PACKET: guest sent one for an IN endpoint")
        super().check(sender)


@dataclass(frozen=True)
class BufferedBulkPacket:
    """struct usb_redir_buffered_bulk_packet_header { uint32_t stream_id, length;
    uint8_t endpoint, status; } + data, host to guest only."""

    TYPE: ClassVar[PacketType] = PacketType.BUFFERED_BULK_PACKET
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<IIBB")

    stream_id: int
    length: int
    endpoint: int
    status: int
    data: bytes = b""
    id: int = 0

    def check(self, sender: Role) -> None:
        if len(self.data) != self.length:
            raise ProtocolError("BUFFERED_BULK_PACKET: data length differs from length field")

    def pack(self, caps: Capability) -> bytes:
        head = pack_struct(self.WIRE, self.stream_id, self.length, self.endpoint, self.status)
        return head + self.data

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        (stream_id, length, endpoint, status), data = _split("BUFFERED_BULK_PACKET", cls.WIRE, body)
        packet = cls(stream_id, length, endpoint, status, data, id=id)
        packet.check(sender)
        return packet
