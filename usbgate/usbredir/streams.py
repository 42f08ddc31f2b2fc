"""usbredir control packets that manage endpoint streams, as frozen dataclasses.

Iso streams, interrupt receiving, bulk streams, bulk receiving and cancel_data_packet: each
body is one fixed struct (usbgate.usbredir.structs.FixedBody), sent by the usb-guest to start
or stop a stream and answered by the usb-host with a status.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from usbgate.usbredir.structs import GUEST_ONLY, HOST_ONLY, FixedBody
from usbgate.usbredir.wire import PacketType, Role


@dataclass(frozen=True)
class StartIsoStream(FixedBody):
    """struct usb_redir_start_iso_stream_header { uint8_t endpoint, pkts_per_urb, no_urbs; }"""

    TYPE: ClassVar[PacketType] = PacketType.START_ISO_STREAM
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BBB")
    endpoint: int
    pkts_per_urb: int
    no_urbs: int
    id: int = 0


@dataclass(frozen=True)
class StopIsoStream(FixedBody):
    """struct usb_redir_stop_iso_stream_header { uint8_t endpoint; }"""

    TYPE: ClassVar[PacketType] = PacketType.STOP_ISO_STREAM
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<B")
    endpoint: int
    id: int = 0


@dataclass(frozen=True)
class IsoStreamStatus(FixedBody):
    """struct usb_redir_iso_stream_status_header { uint8_t status; uint8_t endpoint; }"""

    TYPE: ClassVar[PacketType] = PacketType.ISO_STREAM_STATUS
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BB")
    status: int
    endpoint: int
    id: int = 0


@dataclass(frozen=True)
class StartInterruptReceiving(FixedBody):
    """struct usb_redir_start_interrupt_receiving_header { uint8_t endpoint; }"""

    TYPE: ClassVar[PacketType] = PacketType.START_INTERRUPT_RECEIVING
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<B")
    endpoint: int
    id: int = 0


@dataclass(frozen=True)
class StopInterruptReceiving(FixedBody):
    """struct usb_redir_stop_interrupt_receiving_header { uint8_t endpoint; }"""

    TYPE: ClassVar[PacketType] = PacketType.STOP_INTERRUPT_RECEIVING
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<B")
    endpoint: int
    id: int = 0


@dataclass(frozen=True)
class InterruptReceivingStatus(FixedBody):
    """struct usb_redir_interrupt_receiving_status_header { uint8_t status; uint8_t endpoint; }"""

    TYPE: ClassVar[PacketType] = PacketType.INTERRUPT_RECEIVING_STATUS
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BB")
    status: int
    endpoint: int
    id: int = 0


@dataclass(frozen=True)
class AllocBulkStreams(FixedBody):
    """struct usb_redir_alloc_bulk_streams_header { uint32_t endpoints; uint32_t no_streams; }"""

    TYPE: ClassVar[PacketType] = PacketType.ALLOC_BULK_STREAMS
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<II")
    endpoints: int
    no_streams: int
    id: int = 0


@dataclass(frozen=True)
class FreeBulkStreams(FixedBody):
    """struct usb_redir_free_bulk_streams_header { uint32_t endpoints; }"""

    TYPE: ClassVar[PacketType] = PacketType.FREE_BULK_STREAMS
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<I")
    endpoints: int
    id: int = 0


@dataclass(frozen=True)
class BulkStreamsStatus(FixedBody):
    """struct usb_redir_bulk_streams_status_header { uint32_t endpoints, no_streams;
    uint8_t status; }"""

    TYPE: ClassVar[PacketType] = PacketType.BULK_STREAMS_STATUS
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<IIB")
    endpoints: int
    no_streams: int
    status: int
    id: int = 0


@dataclass(frozen=True)
class CancelDataPacket(FixedBody):
    """No body: cancel the data packet whose id this header carries."""

    TYPE: ClassVar[PacketType] = PacketType.CANCEL_DATA_PACKET
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    id: int = 0


@dataclass(frozen=True)
class StartBulkReceiving(FixedBody):
    """struct usb_redir_start_bulk_receiving_header { uint32_t stream_id, bytes_per_transfer;
    uint8_t endpoint, no_transfers; }"""

    TYPE: ClassVar[PacketType] = PacketType.START_BULK_RECEIVING
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<IIBB")
    stream_id: int
    bytes_per_transfer: int
    endpoint: int
    no_transfers: int
    id: int = 0


@dataclass(frozen=True)
class StopBulkReceiving(FixedBody):
    """struct usb_redir_stop_bulk_receiving_header { uint32_t stream_id; uint8_t endpoint; }"""

    TYPE: ClassVar[PacketType] = PacketType.STOP_BULK_RECEIVING
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<IB")
    stream_id: int
    endpoint: int
    id: int = 0


@dataclass(frozen=True)
class BulkReceivingStatus(FixedBody):
    """struct usb_redir_bulk_receiving_status_header { uint32_t stream_id;
    uint8_t endpoint, status; }"""

    TYPE: ClassVar[PacketType] = PacketType.BULK_RECEIVING_STATUS
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<IBB")
    stream_id: int
    endpoint: int
    status: int
    id: int = 0
