"""A sans-IO usbredir connection: bytes in, typed packets out, and back (h11/wsproto style).

One ``Connection`` is one end of one usbredir stream; it owns no socket::

    conn = Connection(Role.GUEST)
    wire = conn.send(Hello("usbgate"))      # bytes to write
    conn.receive_data(chunk)                # bytes read (b"" at end of file)
    while (event := conn.next_event()) is not NEED_DATA:
        ...                                 # a packet, or CLOSED

The header size is only known once both hellos are known: 12 bytes, or 16 when both sides
announce the 64bits_ids capability. Until our own hello is sent, packets that follow the peer's
hello stay buffered (``next_event`` says NEED_DATA). The receive buffer is bounded: a peer that
announces or sends more than ``max_body`` bytes in one packet is a ``ProtocolError``, as is any
malformed packet. A ``ProtocolError`` is final: the connection is dead.

A relay that only forwards bulk data can ask for ``Frame``s instead (``next_frame``): a bulk
packet is then checked exactly as decoding it would check it and handed out as its raw bytes,
header included, ready to be written to a peer whose capabilities are the same; its data is
never copied into a packet object.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Final

from usbgate.errors import ProtocolError
from usbgate.usbredir.data import BulkPacket
from usbgate.usbredir.packets import PACKET_CLASSES, Hello, Packet
from usbgate.usbredir.wire import (
    DEFAULT_MAX_BODY,
    HEADER_32,
    HEADER_64,
    Capability,
    Header,
    PacketType,
    Role,
)


class Sentinel(enum.Enum):
    """Events that are not packets."""

    NEED_DATA = "need-data"
    """Nothing complete is buffered: feed more bytes."""
    CLOSED = "closed"
    """The peer closed the stream cleanly, between packets."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A bulk packet checked as ``BulkPacket.unpack`` would, kept as its bytes on the wire."""

    TYPE: ClassVar[PacketType] = PacketType.BULK_PACKET
    id: int
    raw: bytes
    """Header and body, exactly as received."""


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED
Event = Packet | Sentinel
_BULK: Final = int(PacketType.BULK_PACKET)
_HELLO: Final = int(PacketType.HELLO)

_KNOWN_TYPES = frozenset(int(t) for t in PacketType)

# Bytes a caller may feed beyond one maximal packet before draining with next_event().
_READ_SLACK = 256 * 1024


def encode(packet: Packet, *, caps: Capability, sender: Role, ids_64bit: bool) -> bytes:
    """One packet on the wire: header + body. Raises ValueError for an unsendable packet."""
    if sender not in packet.SENDERS:
        raise ValueError(f"a {sender.value} never sends {packet.TYPE.name}")
    check = getattr(packet, "check", None)
    if check is not None:
        try:
            check(sender)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from exc
    body = packet.pack(caps)
    header = Header(int(packet.TYPE), len(body), packet.id)
    return header.pack(ids_64bit and packet.TYPE is not PacketType.HELLO) + body


def decode_body(header: Header, body: bytes, *, caps: Capability, sender: Role) -> Packet:
    """The packet a header and its body describe; ProtocolError if they describe none."""
    try:
        cls = PACKET_CLASSES[PacketType(header.type)]
    except ValueError:
        raise ProtocolError(f"unknown packet type {header.type}") from None
    if sender not in cls.SENDERS:
        raise ProtocolError(f"a {sender.value} never sends {cls.TYPE.name}")
    return cls.unpack(body, id=header.id, caps=caps, sender=sender)


class Connection:
    """Our end of a usbredir stream, playing ``our_role`` against a peer in the other role."""

    def __init__(self, our_role: Role, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.our_role = our_role
        self.peer_role = our_role.other
        self.max_body = max_body
        self.our_hello: Hello | None = None
        self.peer_hello: Hello | None = None
        self._buffer = bytearray()
        self._eof = False
        self._dead = False
        # Both hellos are final once known: their common caps are computed once (enum
        # arithmetic on every packet cost ~15 % of usbgate's forwarding time).
        self._caps: Capability | None = None
        self._ids_64bit = False

    @property
    def caps(self) -> Capability | None:
        """Capabilities both sides announced, or None before both hellos are known."""
        if self._caps is None and self.our_hello is not None and self.peer_hello is not None:
            self._caps = self.our_hello.caps & self.peer_hello.caps
            self._ids_64bit = bool(self._caps & Capability.IDS_64BIT)
        return self._caps

    @property
    def ids_64bit(self) -> bool:
        return self.caps is not None and self._ids_64bit

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into packets."""
        return len(self._buffer)

    def send(self, packet: Packet) -> bytes:
        """The bytes to write for ``packet``. Our hello must go first (ValueError otherwise)."""
        if isinstance(packet, Hello):
            if self.our_hello is not None:
                raise ValueError("hello already sent")
            self.our_hello = packet
            return encode(packet, caps=Capability(0), sender=self.our_role, ids_64bit=False)
        caps = self.caps
        if caps is None:
            raise ValueError("cannot send before both hellos are known")
        return encode(packet, caps=caps, sender=self.our_role, ids_64bit=self.ids_64bit)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side."""
        if self._dead:
            raise ProtocolError("connection already failed")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise ValueError("data after end of file")
        self._buffer += data
        if len(self._buffer) > self.max_body + 16 + _READ_SLACK:
            self._fail("peer sent more than one maximal packet without a break")

    def receive_packets(self, data: bytes) -> list[Packet]:
        """Feed ``data`` (unless empty) and return every complete packet buffered (a peer's
        side in tests and benchmarks: whatever is incomplete stays buffered)."""
        if data:
            self.receive_data(data)
        out: list[Packet] = []
        while not isinstance(event := self.next_event(), Sentinel):
            out.append(event)
        return out

    def next_event(self) -> Event:
        """The next complete packet, NEED_DATA, or CLOSED; ProtocolError if the stream is bad."""
        event = self.next_frame(frames=False)
        assert not isinstance(event, Frame)
        return event

    def next_frame(self, *, frames: bool = True) -> Event | Frame:
        """Like ``next_event``, but a bulk packet comes as a checked ``Frame`` (if ``frames``)."""
        if self._dead:
            raise ProtocolError("connection already failed")
        try:
            event = self._next_event(frames)
        except ProtocolError:
            self._dead = True
            raise
        return event

    def _next_event(self, frames: bool) -> Event | Frame:
        if self.peer_hello is None:
            ids_64bit = False
        elif self.our_hello is None:
            return self._need_data_or_eof(waiting_for_us=True)
        else:
            ids_64bit = self.ids_64bit
        wire = HEADER_64 if ids_64bit else HEADER_32
        buffer = self._buffer
        if len(buffer) < wire.size:
            return self._need_data_or_eof()
        type_, length, id_ = wire.unpack_from(buffer)
        if type_ not in _KNOWN_TYPES:
            raise ProtocolError(f"unknown packet type {type_}")
        if length > self.max_body:
            raise ProtocolError(f"packet length {length} exceeds limit {self.max_body}")
        if self.peer_hello is None and type_ != _HELLO:
            raise ProtocolError(f"first packet is type {type_}, not hello")
        if self.peer_hello is not None and type_ == _HELLO:
            raise ProtocolError("second hello")
        end = wire.size + length
        if len(buffer) < end:
            return self._need_data_or_eof()
        caps = self.caps if self.caps is not None else Capability(0)
        if type_ == _BULK and frames:
            BulkPacket.check_frame(buffer, wire.size, end, caps=caps, sender=self.peer_role)
            with memoryview(buffer) as view:
                frame = Frame(id_, bytes(view[:end]))
            del buffer[:end]
            return frame
        with memoryview(buffer) as view:  # one copy, not two (bulk data is large)
            body = bytes(view[wire.size : end])
        packet = decode_body(Header(type_, length, id_), body, caps=caps, sender=self.peer_role)
        del buffer[:end]
        if isinstance(packet, Hello):
            self.peer_hello = packet
        return packet

    def _need_data_or_eof(self, *, waiting_for_us: bool = False) -> Event:
        if not self._eof:
            return NEED_DATA
        if self._buffer and not waiting_for_us:
            raise ProtocolError(f"stream ends inside a packet ({len(self._buffer)} bytes left)")
        return CLOSED

    def _fail(self, reason: str) -> None:
        self._dead = True
        raise ProtocolError(reason)
