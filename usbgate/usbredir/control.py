"""usbredir control packets of a device's life, as frozen dataclasses with ``pack``/``unpack``.

Hello, device connect/disconnect, reset, interface and endpoint info, configuration and
alternate settings, the filter packets. The endpoint stream packets (iso, interrupt, bulk
streams, bulk receiving, cancel) are in usbgate.usbredir.streams.

``pack(caps)`` returns the body (type specific header + data) that follows the usb_redir_header;
``unpack(body, id=, caps=, sender=)`` is its inverse and raises ``ProtocolError`` for any body
that usbredirparser would refuse. ``caps`` is the negotiated capability set (both hellos); some
layouts depend on it. ``sender`` is the role that sent the packet: data packets carry data in
one direction only, and some packets may only come from one side.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from usbgate.errors import ProtocolError
from usbgate.usbredir.structs import (
    EITHER,
    GUEST_ONLY,
    HOST_ONLY,
    FixedBody,
    pack_bytes,
    pack_struct,
)
from usbgate.usbredir.wire import Capability, PacketType, Role

# Capability words accepted in a hello: 32 * 16 capabilities is far beyond 0.7's 8.
MAX_CAPABILITY_WORDS = 16


# --- control packets ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """struct usb_redir_hello_header { char version[64]; uint32_t capabilities[0]; }"""

    TYPE: ClassVar[PacketType] = PacketType.HELLO
    SENDERS: ClassVar[frozenset[Role]] = EITHER
    VERSION_SIZE: ClassVar[int] = 64

    version: str
    capabilities: tuple[int, ...] = (int(Capability(0xFF)),)
    id: int = 0

    @property
    def caps(self) -> Capability:
        """The capability bits this side announces (first word; later words are unknown)."""
        return Capability(self.capabilities[0] & 0xFF) if self.capabilities else Capability(0)

    def pack(self, caps: Capability) -> bytes:
        raw = self.version.encode("latin-1", "replace")[: self.VERSION_SIZE - 1]
        words = pack_struct(struct.Struct(f"<{len(self.capabilities)}I"), *self.capabilities)
        return raw.ljust(self.VERSION_SIZE, b"\0") + words

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        extra = len(body) - cls.VERSION_SIZE
        if extra < 0 or extra % 4 or extra // 4 > MAX_CAPABILITY_WORDS:
            raise ProtocolError(f"HELLO: bad length {len(body)}")
        version = body[: cls.VERSION_SIZE].split(b"\0", 1)[0].decode("latin-1")
        words = struct.unpack(f"<{extra // 4}I", body[cls.VERSION_SIZE :])
        return cls(version, tuple(words), id=id)


@dataclass(frozen=True)
class DeviceConnect:
    """struct usb_redir_device_connect_header; device_version_bcd only with
    usb_redir_cap_connect_device_version on both sides ("the packet will be 2 bytes less")."""

    TYPE: ClassVar[PacketType] = PacketType.DEVICE_CONNECT
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BBBBHH")
    WIRE_BCD: ClassVar[struct.Struct] = struct.Struct("<BBBBHHH")

    speed: int
    device_class: int
    device_subclass: int
    device_protocol: int
    vendor_id: int
    product_id: int
    device_version_bcd: int = 0
    id: int = 0

    def pack(self, caps: Capability) -> bytes:
        head = (self.speed, self.device_class, self.device_subclass, self.device_protocol)
        ids = (self.vendor_id, self.product_id)
        if caps & Capability.CONNECT_DEVICE_VERSION:
            return pack_struct(self.WIRE_BCD, *head, *ids, self.device_version_bcd)
        return pack_struct(self.WIRE, *head, *ids)

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        with_bcd = bool(caps & Capability.CONNECT_DEVICE_VERSION)
        wire = cls.WIRE_BCD if with_bcd else cls.WIRE
        if len(body) != wire.size:
            raise ProtocolError(f"DEVICE_CONNECT: body is {len(body)} bytes, expected {wire.size}")
        speed, dclass, subclass, protocol, vid, pid, *bcd = wire.unpack(body)
        return cls(speed, dclass, subclass, protocol, vid, pid, bcd[0] if bcd else 0, id=id)


@dataclass(frozen=True)
class DeviceDisconnect(FixedBody):
    """No body: the usb-host's device went away."""

    TYPE: ClassVar[PacketType] = PacketType.DEVICE_DISCONNECT
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    id: int = 0


@dataclass(frozen=True)
class Reset(FixedBody):
    """No body: the usb-guest resets the device."""

    TYPE: ClassVar[PacketType] = PacketType.RESET
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    id: int = 0


@dataclass(frozen=True)
class Interface:
    """One interface of interface_info: number, class, subclass, protocol."""

    number: int
    interface_class: int
    interface_subclass: int
    interface_protocol: int


@dataclass(frozen=True)
class InterfaceInfo:
    """struct usb_redir_interface_info_header { uint32_t interface_count;
    uint8_t interface[32], interface_class[32], interface_subclass[32], interface_protocol[32]; }"""

    TYPE: ClassVar[PacketType] = PacketType.INTERFACE_INFO
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<I32s32s32s32s")
    MAX: ClassVar[int] = 32

    interfaces: tuple[Interface, ...]
    id: int = 0

    def pack(self, caps: Capability) -> bytes:
        if len(self.interfaces) > self.MAX:
            raise ValueError(f"at most {self.MAX} interfaces")
        columns = [bytes(col).ljust(self.MAX, b"\0") for col in zip(*self._rows(), strict=True)]
        if not columns:
            columns = [b"\0" * self.MAX] * 4
        return pack_bytes(self.WIRE, len(self.interfaces), *columns)

    def _rows(self) -> list[tuple[int, int, int, int]]:
        return [
            (i.number, i.interface_class, i.interface_subclass, i.interface_protocol)
            for i in self.interfaces
        ]

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        if len(body) != cls.WIRE.size:
            raise ProtocolError(f"INTERFACE_INFO: body is {len(body)} bytes")
        count, numbers, classes, subclasses, protocols = cls.WIRE.unpack(body)
        if count > cls.MAX:
            raise ProtocolError(f"INTERFACE_INFO: interface_count {count} > {cls.MAX}")
        rows = zip(numbers, classes, subclasses, protocols, strict=True)
        return cls(tuple(Interface(*row) for row in list(rows)[:count]), id=id)


def _u8_columns(*columns: tuple[int, ...]) -> list[bytes]:
    out = []
    for col in columns:
        if len(col) != 32:
            raise ValueError("ep_info columns have exactly 32 entries")
        out.append(bytes(col))
    return out


_ZERO32 = (0,) * 32


@dataclass(frozen=True)
class EpInfo:
    """struct usb_redir_ep_info_header { uint8_t type[32], interval[32], interface[32];
    uint16_t max_packet_size[32] (cap ep_info_max_packet_size);
    uint32_t max_streams[32] (cap bulk_streams); } -- "first 0-15 out, then 0-15 in"."""

    TYPE: ClassVar[PacketType] = PacketType.EP_INFO
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    BASE: ClassVar[struct.Struct] = struct.Struct("<32s32s32s")
    SIZES: ClassVar[struct.Struct] = struct.Struct("<32H")
    STREAMS: ClassVar[struct.Struct] = struct.Struct("<32I")

    types: tuple[int, ...]
    intervals: tuple[int, ...] = _ZERO32
    interfaces: tuple[int, ...] = _ZERO32
    max_packet_sizes: tuple[int, ...] = _ZERO32
    max_streams: tuple[int, ...] = _ZERO32
    id: int = 0

    @staticmethod
    def body_size(caps: Capability) -> int:
        size = EpInfo.BASE.size
        if caps & Capability.EP_INFO_MAX_PACKET_SIZE:
            size += EpInfo.SIZES.size
        if caps & Capability.BULK_STREAMS:
            size += EpInfo.STREAMS.size
        return size

    def pack(self, caps: Capability) -> bytes:
        out = pack_bytes(self.BASE, *_u8_columns(self.types, self.intervals, self.interfaces))
        if caps & Capability.EP_INFO_MAX_PACKET_SIZE:
            out += pack_struct(self.SIZES, *self.max_packet_sizes)
        if caps & Capability.BULK_STREAMS:
            out += pack_struct(self.STREAMS, *self.max_streams)
        return out

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        if len(body) != cls.body_size(caps):
            raise ProtocolError(f"EP_INFO: body is {len(body)} bytes")
        types, intervals, interfaces = (tuple(c) for c in cls.BASE.unpack_from(body))
        offset = cls.BASE.size
        sizes: tuple[int, ...] = _ZERO32
        streams: tuple[int, ...] = _ZERO32
        if caps & Capability.EP_INFO_MAX_PACKET_SIZE:
            sizes = cls.SIZES.unpack_from(body, offset)
            offset += cls.SIZES.size
        if caps & Capability.BULK_STREAMS:
            streams = cls.STREAMS.unpack_from(body, offset)
        return cls(types, intervals, interfaces, sizes, streams, id=id)


@dataclass(frozen=True)
class SetConfiguration(FixedBody):
    """struct usb_redir_set_configuration_header { uint8_t configuration; }"""

    TYPE: ClassVar[PacketType] = PacketType.SET_CONFIGURATION
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<B")
    configuration: int
    id: int = 0


@dataclass(frozen=True)
class GetConfiguration(FixedBody):
    """No body: the usb-guest asks for the active configuration."""

    TYPE: ClassVar[PacketType] = PacketType.GET_CONFIGURATION
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    id: int = 0


@dataclass(frozen=True)
class ConfigurationStatus(FixedBody):
    """struct usb_redir_configuration_status_header { uint8_t status; uint8_t configuration; }"""

    TYPE: ClassVar[PacketType] = PacketType.CONFIGURATION_STATUS
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BB")
    status: int
    configuration: int
    id: int = 0


@dataclass(frozen=True)
class SetAltSetting(FixedBody):
    """struct usb_redir_set_alt_setting_header { uint8_t interface; uint8_t alt; }"""

    TYPE: ClassVar[PacketType] = PacketType.SET_ALT_SETTING
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BB")
    interface: int
    alt: int
    id: int = 0


@dataclass(frozen=True)
class GetAltSetting(FixedBody):
    """struct usb_redir_get_alt_setting_header { uint8_t interface; }"""

    TYPE: ClassVar[PacketType] = PacketType.GET_ALT_SETTING
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<B")
    interface: int
    id: int = 0


@dataclass(frozen=True)
class AltSettingStatus(FixedBody):
    """struct usb_redir_alt_setting_status_header { uint8_t status, interface, alt; }"""

    TYPE: ClassVar[PacketType] = PacketType.ALT_SETTING_STATUS
    SENDERS: ClassVar[frozenset[Role]] = HOST_ONLY
    WIRE: ClassVar[struct.Struct] = struct.Struct("<BBB")
    status: int
    interface: int
    alt: int
    id: int = 0


@dataclass(frozen=True)
class FilterReject(FixedBody):
    """No body: the usb-guest refused the announced device."""

    TYPE: ClassVar[PacketType] = PacketType.FILTER_REJECT
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    id: int = 0


@dataclass(frozen=True)
class FilterFilter:
    """Data: a 0-terminated usbredirfilter string "<class>,<vendor>,<product>,<version>,<allow>"
    rules joined by '|'."""

    TYPE: ClassVar[PacketType] = PacketType.FILTER_FILTER
    SENDERS: ClassVar[frozenset[Role]] = EITHER
    MAX: ClassVar[int] = 64 * 1024

    rules: str
    id: int = 0

    def pack(self, caps: Capability) -> bytes:
        raw = self.rules.encode("ascii")
        if b"\0" in raw:
            raise ValueError("filter string contains NUL")
        return raw + b"\0"

    @classmethod
    def unpack(cls, body: bytes, *, id: int, caps: Capability, sender: Role) -> Self:
        if not body or body[-1] != 0 or 0 in body[:-1] or len(body) > cls.MAX:
            raise ProtocolError("FILTER_FILTER: not one 0-terminated string")
        try:
            return cls(body[:-1].decode("ascii"), id=id)
        except UnicodeDecodeError as exc:
            raise ProtocolError("FILTER_FILTER: not ASCII") from exc


@dataclass(frozen=True)
class DeviceDisconnectAck(FixedBody):
    """No body: the usb-guest processed device_disconnect."""

    TYPE: ClassVar[PacketType] = PacketType.DEVICE_DISCONNECT_ACK
    SENDERS: ClassVar[frozenset[Role]] = GUEST_ONLY
    id: int = 0
