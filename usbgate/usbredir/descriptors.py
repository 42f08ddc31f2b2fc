"""The USB standard descriptors usbgate reads while probing a device (USB 2.0 spec, chapter 9).

Parsers take the bytes a device returned for GET_DESCRIPTOR and raise ``DescriptorError`` for
anything that does not follow chapter 9; the gateway turns that into a denial.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from usbgate.errors import UsbgateError


class DescriptorError(UsbgateError):
    """A descriptor returned by the device is malformed."""


class DescriptorType(enum.IntEnum):
    """bDescriptorType values usbgate reads."""

    DEVICE = 1
    """Device descriptor (18 bytes)."""
    CONFIGURATION = 2
    """Configuration descriptor, followed by its interfaces and endpoints."""
    STRING = 3
    """String descriptor (UTF-16LE), index 0 lists the language ids."""
    INTERFACE = 4
    """Interface descriptor inside a configuration."""
    ENDPOINT = 5
    """Endpoint descriptor inside a configuration."""
    OTHER_SPEED_CONFIGURATION = 7
    """A configuration as it would be at the other speed: interfaces and endpoints, too."""


# Standard requests (USB 2.0 table 9-4) and bmRequestType for a device-to-host standard request.
REQUEST_GET_DESCRIPTOR = 0x06
REQUEST_GET_CONFIGURATION = 0x08
REQUESTTYPE_IN_STANDARD_DEVICE = 0x80

# Table 9-8: bLength, bDescriptorType, bcdUSB, bDeviceClass, bDeviceSubClass,
# bDeviceProtocol, bMaxPacketSize0, idVendor, idProduct, bcdDevice, iManufacturer, iProduct,
# iSerialNumber, bNumConfigurations
DEVICE_DESCRIPTOR = struct.Struct("<BBHBBBBHHHBBBB")
# Table 9-10: bLength, bDescriptorType, wTotalLength, bNumInterfaces, bConfigurationValue,
# iConfiguration, bmAttributes, bMaxPower
CONFIG_DESCRIPTOR = struct.Struct("<BBHBBBBB")
# Table 9-12: bLength, bDescriptorType, bInterfaceNumber, bAlternateSetting, bNumEndpoints,
# bInterfaceClass, bInterfaceSubClass, bInterfaceProtocol, iInterface
INTERFACE_DESCRIPTOR = struct.Struct("<BBBBBBBBB")


@dataclass(frozen=True)
class DeviceDescriptor:
    """The fields of a device descriptor usbgate compares and decides on."""

    bcd_usb: int
    device_class: int
    device_subclass: int
    device_protocol: int
    max_packet_size0: int
    vendor_id: int
    product_id: int
    bcd_device: int
    manufacturer_index: int
    product_index: int
    serial_index: int
    num_configurations: int

    @classmethod
    def parse(cls, data: bytes) -> DeviceDescriptor:
        if len(data) < DEVICE_DESCRIPTOR.size:
            raise DescriptorError(f"device descriptor is {len(data)} bytes, expected 18")
        length, dtype, *fields = DEVICE_DESCRIPTOR.unpack_from(data)
        if length != DEVICE_DESCRIPTOR.size or dtype != DescriptorType.DEVICE:
            raise DescriptorError(f"not a device descriptor (bLength {length}, type {dtype})")
        return cls(*fields)


@dataclass(frozen=True)
class InterfaceDescriptor:
    """One interface alternate setting of a configuration."""

    number: int
    alternate: int
    interface_class: int
    interface_subclass: int
    interface_protocol: int

    @property
    def triple(self) -> tuple[int, int, int]:
        return (self.interface_class, self.interface_subclass, self.interface_protocol)


@dataclass(frozen=True)
class ConfigDescriptor:
    """A configuration and every interface descriptor (all alternate settings) inside it."""

    total_length: int
    num_interfaces: int
    value: int
    interfaces: tuple[InterfaceDescriptor, ...]

    @staticmethod
    def total_length_of(head: bytes) -> int:
        """wTotalLength from the first 9 bytes of a configuration descriptor."""
        if len(head) < CONFIG_DESCRIPTOR.size:
            raise DescriptorError("configuration descriptor shorter than 9 bytes")
        length, dtype, total, *_ = CONFIG_DESCRIPTOR.unpack_from(head)
        if length < CONFIG_DESCRIPTOR.size or dtype != DescriptorType.CONFIGURATION:
            raise DescriptorError("not a configuration descriptor")
        if total < CONFIG_DESCRIPTOR.size:
            raise DescriptorError(f"wTotalLength {total} < 9")
        return int(total)

    @classmethod
    def parse(cls, data: bytes) -> ConfigDescriptor:
        total = cls.total_length_of(data)
        if len(data) != total:
            raise DescriptorError(f"configuration is {len(data)} bytes, wTotalLength {total}")
        _, _, _, num_interfaces, value, *_ = CONFIG_DESCRIPTOR.unpack_from(data)
        interfaces = []
        offset = data[0]
        while offset < total:
            if total - offset < 2:
                raise DescriptorError("truncated descriptor inside configuration")
            length, dtype = data[offset], data[offset + 1]
            if length < 2 or offset + length > total:
                raise DescriptorError(f"bad bLength {length} at offset {offset}")
            if dtype == DescriptorType.INTERFACE:
                if length < INTERFACE_DESCRIPTOR.size:
                    raise DescriptorError("interface descriptor shorter than 9 bytes")
                _, _, number, alt, _, icls, isub, iproto, _ = INTERFACE_DESCRIPTOR.unpack_from(
                    data, offset
                )
                interfaces.append(InterfaceDescriptor(number, alt, icls, isub, iproto))
            offset += length
        return cls(total, num_interfaces, value, tuple(interfaces))


def interface_triples_in(data: bytes) -> list[tuple[int, int, int]]:
    """The (class, subclass, protocol) of every interface descriptor in ``data``.

    ``data`` is a configuration-like descriptor, possibly cut short by a short wLength: the
    walk stops at the end of the bytes, and only a descriptor that contradicts its own bLength
    is an error.
    """
    triples = []
    offset = 0
    while offset + 2 <= len(data):
        length, dtype = data[offset], data[offset + 1]
        if length < 2:
            raise DescriptorError(f"bad bLength {length} at offset {offset}")
        if dtype == DescriptorType.INTERFACE:
            if length < INTERFACE_DESCRIPTOR.size:
                raise DescriptorError("interface descriptor shorter than 9 bytes")
            if offset + 8 > len(data):
                break  # cut before its class bytes: the reader cannot see them either
            triples.append((data[offset + 5], data[offset + 6], data[offset + 7]))
        offset += length
    return triples


def parse_string(data: bytes) -> str:
    """A string descriptor's text (UTF-16LE after bLength, bDescriptorType)."""
    if len(data) < 2 or data[1] != DescriptorType.STRING or data[0] > len(data) or data[0] < 2:
        raise DescriptorError("not a string descriptor")
    raw = data[2 : data[0]]
    if len(raw) % 2:
        raise DescriptorError("string descriptor has an odd length")
    return raw.decode("utf-16-le", "replace")


def parse_langids(data: bytes) -> list[int]:
    """The language ids listed by string descriptor 0."""
    if len(data) < 2 or data[1] != DescriptorType.STRING or data[0] > len(data):
        raise DescriptorError("not a string descriptor")
    raw = data[2 : data[0] - (data[0] % 2)]
    return [int.from_bytes(raw[i : i + 2], "little") for i in range(0, len(raw), 2)]
