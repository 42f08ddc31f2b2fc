"""usbredir wire constants and the packet header.

Quotes are from "USB Network Redirection protocol description version 0.7" (Debian's
libusbredirhost-dev, usb-redirection-protocol.md) and usbredirproto.h. "All integers in the
protocol are send over the pipe in least significant byte first order. All structs send over the
pipe are packed (no padding)."
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from usbgate.errors import ProtocolError

# struct usb_redir_header { uint32_t type; uint32_t length; uint32_t id; }
# "Or, if both sides have the usb_redir_cap_64bits_ids capability": uint64_t id.
# "the hello packet always has 32 bits id fields!"
HEADER_32 = struct.Struct("<III")
HEADER_64 = struct.Struct("<IIQ")

# Largest body (type header + data) accepted from a peer. usbredirhost's largest transfers
# (bulk with 32-bit length, buffered bulk) stay well below; anything larger is hostile.
DEFAULT_MAX_BODY = 4 * 1024 * 1024


class PacketType(enum.IntEnum):
    """usb_redir_header.type: which packet follows the header."""

    HELLO = 0
    """First packet of each side: version string and capability words."""
    DEVICE_CONNECT = 1
    """usb-host: a device is available (speed, class, VID:PID, bcdDevice)."""
    DEVICE_DISCONNECT = 2
    """usb-host: the device went away (unplugged, or the gateway revoked it)."""
    RESET = 3
    """usb-guest: reset the device."""
    INTERFACE_INFO = 4
    """usb-host: interface numbers and classes of the active configuration."""
    EP_INFO = 5
    """usb-host: type, interval, interface (and sizes) of all 32 endpoints."""
    SET_CONFIGURATION = 6
    """usb-guest: select a configuration."""
    GET_CONFIGURATION = 7
    """usb-guest: ask for the active configuration."""
    CONFIGURATION_STATUS = 8
    """usb-host: answer to set/get_configuration."""
    SET_ALT_SETTING = 9
    """usb-guest: select an interface's alternate setting."""
    GET_ALT_SETTING = 10
    """usb-guest: ask for an interface's alternate setting."""
    ALT_SETTING_STATUS = 11
    """usb-host: answer to set/get_alt_setting."""
    START_ISO_STREAM = 12
    """usb-guest: start an isochronous stream on an endpoint."""
    STOP_ISO_STREAM = 13
    """usb-guest: stop an isochronous stream."""
    ISO_STREAM_STATUS = 14
    """usb-host: answer to start/stop_iso_stream, or an unsolicited stream error."""
    START_INTERRUPT_RECEIVING = 15
    """usb-guest: poll an interrupt-in endpoint on the host side."""
    STOP_INTERRUPT_RECEIVING = 16
    """usb-guest: stop polling an interrupt-in endpoint."""
    INTERRUPT_RECEIVING_STATUS = 17
    """usb-host: answer to start/stop_interrupt_receiving, or an error."""
    ALLOC_BULK_STREAMS = 18
    """usb-guest: allocate USB 3 bulk streams on endpoints."""
    FREE_BULK_STREAMS = 19
    """usb-guest: free USB 3 bulk streams."""
    BULK_STREAMS_STATUS = 20
    """usb-host: answer to alloc/free_bulk_streams."""
    CANCEL_DATA_PACKET = 21
    """usb-guest: cancel the data packet whose id is in the header."""
    FILTER_REJECT = 22
    """usb-guest: the announced device was refused by a filter."""
    FILTER_FILTER = 23
    """Either side: the filter rules in force, as a usbredirfilter string."""
    DEVICE_DISCONNECT_ACK = 24
    """usb-guest: it has processed a device_disconnect."""
    START_BULK_RECEIVING = 25
    """usb-guest: start buffered reading from a bulk-in endpoint."""
    STOP_BULK_RECEIVING = 26
    """usb-guest: stop buffered bulk reading."""
    BULK_RECEIVING_STATUS = 27
    """usb-host: answer to start/stop_bulk_receiving, or an error."""
    CONTROL_PACKET = 100
    """Data: a control transfer (request from the guest, result from the host)."""
    BULK_PACKET = 101
    """Data: a bulk transfer."""
    ISO_PACKET = 102
    """Data: one isochronous packet."""
    INTERRUPT_PACKET = 103
    """Data: an interrupt transfer."""
    BUFFERED_BULK_PACKET = 104
    """Data: bulk-in data read by the host in buffered bulk mode."""


class Capability(enum.IntFlag):
    """Bits of the first hello capability word."""

    BULK_STREAMS = 1 << 0
    """USB 3 bulk streams; ep_info carries max_streams."""
    CONNECT_DEVICE_VERSION = 1 << 1
    """device_connect carries device_version_bcd."""
    FILTER = 1 << 2
    """filter_reject and filter_filter are understood."""
    DEVICE_DISCONNECT_ACK = 1 << 3
    """device_disconnect is acknowledged with device_disconnect_ack."""
    EP_INFO_MAX_PACKET_SIZE = 1 << 4
    """ep_info carries max_packet_size."""
    IDS_64BIT = 1 << 5
    """The header id is 64 bits wide (after the hellos)."""
    BULK_LENGTH_32BIT = 1 << 6
    """bulk_packet carries length_high."""
    BULK_RECEIVING = 1 << 7
    """Buffered bulk input packets are understood."""


ALL_CAPABILITIES = Capability(0xFF)


class Status(enum.IntEnum):
    """Status field of host replies; unknown values are errors."""

    SUCCESS = 0
    """The request succeeded."""
    CANCELLED = 1
    """The transfer was cancelled."""
    INVAL = 2
    """Invalid packet type / length / endpoint."""
    IOERROR = 3
    """I/O error."""
    STALL = 4
    """The endpoint stalled."""
    TIMEOUT = 5
    """The request timed out."""
    BABBLE = 6
    """The device babbled."""


class Speed(enum.IntEnum):
    """device_connect speed field."""

    LOW = 0
    """USB 1 low speed."""
    FULL = 1
    """USB 1 full speed."""
    HIGH = 2
    """USB 2 high speed."""
    SUPER = 3
    """USB 3 super speed."""
    UNKNOWN = 255
    """Not known."""


class EndpointType(enum.IntEnum):
    """ep_info type field (matches the USB spec's bmAttributes transfer type)."""

    CONTROL = 0
    """Control endpoint."""
    ISO = 1
    """Isochronous endpoint."""
    BULK = 2
    """Bulk endpoint."""
    INTERRUPT = 3
    """Interrupt endpoint."""
    INVALID = 255
    """No such endpoint."""


class Role(enum.Enum):
    """Which end of a usbredir connection a party plays."""

    HOST = "usb-host"
    """Owns the device (usbredirect, spice-gtk)."""
    GUEST = "usb-guest"
    """Uses the device (QEMU's usb-redir)."""

    @property
    def other(self) -> Role:
        return Role.GUEST if self is Role.HOST else Role.HOST


@dataclass(frozen=True)
class Header:
    """A decoded usb_redir_header."""

    type: int
    length: int
    id: int

    @staticmethod
    def size(ids_64bit: bool) -> int:
        return HEADER_64.size if ids_64bit else HEADER_32.size

    def pack(self, ids_64bit: bool) -> bytes:
        wire = HEADER_64 if ids_64bit else HEADER_32
        try:
            return wire.pack(self.type, self.length, self.id)
        except struct.error as exc:
            raise ValueError(f"header field out of range: {self}") from exc

    @classmethod
    def unpack(cls, buf: bytes | memoryview, ids_64bit: bool) -> Header:
        wire = HEADER_64 if ids_64bit else HEADER_32
        if len(buf) < wire.size:
            raise ProtocolError("truncated usbredir header")
        type_, length, id_ = wire.unpack_from(buf)
        return cls(type_, length, id_)
