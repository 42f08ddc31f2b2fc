"""Probing a held device: read its descriptors and check them against its announcement.

The owner announces a device with interface_info and device_connect, and those packets are all
QEMU would judge it by. Before deciding, usbgate reads what the device itself says (device
descriptor, every configuration descriptor, the serial string) with GET_DESCRIPTOR control
transfers, as a usb-guest would. A device whose descriptors contradict its announcement is
denied: that is what a device (or owner) lying its way past a whitelist looks like.

The policy then judges the union of every interface of every configuration and alternate
setting, not only the active one: the guest can switch configurations later.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass

from usbgate.errors import UsbgateError
from usbgate.rules.policy import Device, InterfaceTriple
from usbgate.usbredir.descriptors import (
    ConfigDescriptor,
    DescriptorError,
    DescriptorType,
    DeviceDescriptor,
    parse_langids,
    parse_string,
)
from usbgate.usbredir.packets import DeviceConnect, InterfaceInfo

# At most this many configurations are read (real devices have 1, rarely 2).
MAX_CONFIGURATIONS = 8
MAX_CONFIG_LENGTH = 16 * 1024

# Reads one descriptor: (wValue, wIndex, wLength) -> the data, or raises ProbeFailed.
DescriptorReader = Callable[[int, int, int], Awaitable[bytes]]
# The probe without I/O: yields (wValue, wIndex, wLength), is sent the data, returns the result.
ProbeSteps = Generator[tuple[int, int, int], bytes, "ProbeResult"]
_Read = Generator[tuple[int, int, int], bytes, bytes]


class ProbeFailed(UsbgateError):
    """The device did not answer a descriptor request sensibly."""


class Contradiction(UsbgateError):
    """The device's descriptors contradict what its owner announced."""


@dataclass(frozen=True)
class ProbeResult:
    """What the device's own descriptors say."""

    device: DeviceDescriptor
    configs: tuple[ConfigDescriptor, ...]
    serial: str | None
    raw: dict[tuple[int, int], bytes]
    """Raw descriptors read, by (wValue, wIndex): later answers to QEMU must agree."""

    def interface_triples(self) -> tuple[InterfaceTriple, ...]:
        seen = dict.fromkeys(i.triple for c in self.configs for i in c.interfaces)
        return tuple(seen)


def probe_steps() -> ProbeSteps:
    """Read the device, configuration(s) and serial descriptors, one request per step (sans-IO).

    Each ``yield`` is a GET_DESCRIPTOR request ``(wValue, wIndex, wLength)``; send it the data
    the device answered. The generator returns the ProbeResult or raises ProbeFailed.
    """
    raw: dict[tuple[int, int], bytes] = {}

    def get(dtype: int, index: int, langid: int, length: int) -> _Read:
        value = dtype << 8 | index
        data = yield (value, langid, length)
        if len(data) > length:
            raise ProbeFailed(f"GET_DESCRIPTOR {value:#06x} answered {len(data)} > {length} bytes")
        raw[(value, langid)] = data
        return data

    try:
        device = DeviceDescriptor.parse((yield from get(DescriptorType.DEVICE, 0, 0, 18)))
        if not 1 <= device.num_configurations <= MAX_CONFIGURATIONS:
            raise ProbeFailed(f"bNumConfigurations is {device.num_configurations}")
        configs = []
        for index in range(device.num_configurations):
            head = yield from get(DescriptorType.CONFIGURATION, index, 0, 9)
            total = ConfigDescriptor.total_length_of(head)
            if total > MAX_CONFIG_LENGTH:
                raise ProbeFailed(f"configuration {index} claims {total} bytes")
            full = yield from get(DescriptorType.CONFIGURATION, index, 0, total)
            configs.append(ConfigDescriptor.parse(full))
        serial = None
        if device.serial_index:
            langids = parse_langids((yield from get(DescriptorType.STRING, 0, 0, 255)))
            if langids:
                text = yield from get(DescriptorType.STRING, device.serial_index, langids[0], 255)
                serial = parse_string(text)
    except DescriptorError as exc:
        raise ProbeFailed(str(exc)) from exc
    return ProbeResult(device, tuple(configs), serial, raw)


async def probe(read: DescriptorReader) -> ProbeResult:
    """probe_steps driven by an async ``read`` (tests, and anything that owns its I/O)."""
    steps = probe_steps()
    request = next(steps)
    while True:
        data = await read(*request)
        try:
            request = steps.send(data)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def reconcile(
    connect: DeviceConnect,
    interface_info: InterfaceInfo | None,
    result: ProbeResult,
    *,
    bcd_announced: bool,
) -> Device:
    """The device to judge, once its announcement and descriptors agree; else Contradiction."""
    d = result.device
    said = (connect.vendor_id, connect.product_id, connect.device_class,
            connect.device_subclass, connect.device_protocol)  # fmt: skip
    seen = (d.vendor_id, d.product_id, d.device_class, d.device_subclass, d.device_protocol)
    if said != seen:
        raise Contradiction(
            "announced {:04x}:{:04x} class {:02x}/{:02x}/{:02x}, descriptor says "
            "{:04x}:{:04x} class {:02x}/{:02x}/{:02x}".format(*said, *seen)
        )
    if bcd_announced and connect.device_version_bcd != d.bcd_device:
        raise Contradiction(
            f"announced bcdDevice {connect.device_version_bcd:04x}, descriptor {d.bcd_device:04x}"
        )
    if interface_info is None:
        raise Contradiction("device_connect without interface_info")
    described = {(i.number, *i.triple) for c in result.configs for i in c.interfaces}
    for iface in interface_info.interfaces:
        key = (iface.number, iface.interface_class, iface.interface_subclass,
               iface.interface_protocol)  # fmt: skip
        if key not in described:
            raise Contradiction(
                "announced interface {} {:02x}:{:02x}:{:02x} is in no configuration "
                "descriptor".format(*key)
            )
    return Device(
        vendor_id=d.vendor_id,
        product_id=d.product_id,
        device_class=d.device_class,
        interfaces=result.interface_triples(),
        serial=result.serial,
        device_subclass=d.device_subclass,
        device_protocol=d.device_protocol,
        bcd_device=d.bcd_device,
    )


def interfaces_within(interface_info: InterfaceInfo, result: ProbeResult) -> bool:
    """True when a later interface_info only lists interfaces the descriptors described."""
    described = {(i.number, *i.triple) for c in result.configs for i in c.interfaces}
    return all(
        (i.number, i.interface_class, i.interface_subclass, i.interface_protocol) in described
        for i in interface_info.interfaces
    )
