"""A simulated USB device on the owner's side of usbredir (what `usbredirect` would be).

It announces a device (interface_info, ep_info, device_connect) and answers what QEMU and
usbgate's probe ask, from descriptors built below. The tests and `scripts/demo` use it where
no USB hardware exists; it is also a quick way to check the wiring of a real deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

from usbgate.errors import ProtocolError
from usbgate.storage import BulkOnlyTransport, FileStore, Identity, ScsiDisk, Transfer
from usbgate.usbredir.codec import CLOSED, NEED_DATA, Connection
from usbgate.usbredir.descriptors import DescriptorType
from usbgate.usbredir.packets import (
    AltSettingStatus,
    BulkPacket,
    ConfigurationStatus,
    ControlPacket,
    DeviceConnect,
    DeviceDisconnect,
    EpInfo,
    GetAltSetting,
    GetConfiguration,
    Hello,
    Interface,
    InterfaceInfo,
    InterruptPacket,
    InterruptReceivingStatus,
    Packet,
    Reset,
    SetAltSetting,
    SetConfiguration,
    StartInterruptReceiving,
    StopInterruptReceiving,
)
from usbgate.usbredir.wire import ALL_CAPABILITIES, EndpointType, Role, Speed, Status

HID_KEYBOARD = (0x03, 0x01, 0x01)
MASS_STORAGE = (0x08, 0x06, 0x50)
VENDOR = (0xFF, 0x00, 0x00)


@dataclass
class FakeDevice:
    """A USB device as its owner announces it, and the descriptors it returns when asked."""

    vendor_id: int = 0x0781
    product_id: int = 0x5567
    device_class: int = 0
    interfaces: tuple[tuple[int, int, int], ...] = (MASS_STORAGE,)
    serial: str | None = "4C530001"
    bcd_device: int = 0x0100
    # Descriptor values that differ from the announcement (a lying device); None = same.
    descriptor_vendor_id: int | None = None
    descriptor_interfaces: tuple[tuple[int, int, int], ...] | None = None
    # Never answer control transfers (a device that hangs, or an owner stalling the probe).
    mute: bool = False
    product_name: str = "fake device"

    def interface_info(self) -> InterfaceInfo:
        return InterfaceInfo(tuple(Interface(n, *t) for n, t in enumerate(self.interfaces)))

    def ep_info(self) -> EpInfo:
        types = [EndpointType.INVALID] * 32
        interfaces = [0] * 32
        types[0] = types[16] = EndpointType.CONTROL
        for n, _ in enumerate(self.interfaces):
            types[17 + n] = EndpointType.BULK  # one IN endpoint per interface: 0x81, 0x82...
            interfaces[17 + n] = n
        sizes = [64 if t != EndpointType.INVALID else 0 for t in types]
        return EpInfo(tuple(types), (0,) * 32, tuple(interfaces), tuple(sizes))

    def device_connect(self) -> DeviceConnect:
        return DeviceConnect(
            Speed.HIGH, self.device_class, 0, 0, self.vendor_id, self.product_id, self.bcd_device
        )

    def device_descriptor(self) -> bytes:
        vid = self.vendor_id if self.descriptor_vendor_id is None else self.descriptor_vendor_id
        serial_index = 3 if self.serial is not None else 0
        return struct.pack(
            "<BBHBBBBHHHBBBB", 18, DescriptorType.DEVICE, 0x0200, self.device_class, 0, 0, 64,
            vid, self.product_id, self.bcd_device, 1, 2, serial_index, 1,
        )  # fmt: skip

    def config_descriptor(self) -> bytes:
        triples = self.interfaces
        if self.descriptor_interfaces is not None:
            triples = self.descriptor_interfaces
        body = b""
        for n, (cls, sub, proto) in enumerate(triples):
            body += struct.pack("<BBBBBBBBB", 9, DescriptorType.INTERFACE, n, 0, 1,
                                cls, sub, proto, 0)  # fmt: skip
            body += struct.pack("<BBBBHB", 7, DescriptorType.ENDPOINT, 0x81 + n, 2, 64, 0)
        total = 9 + len(body)
        head = struct.pack("<BBHBBBBB", 9, DescriptorType.CONFIGURATION, total, len(triples),
                           1, 0, 0x80, 50)  # fmt: skip
        return head + body

    def string_descriptor(self, index: int) -> bytes | None:
        if index == 0:
            return bytes([4, DescriptorType.STRING]) + struct.pack("<H", 0x0409)
        text = {1: "vmshield", 2: self.product_name, 3: self.serial}.get(index)
        if text is None:
            return None
        raw = text.encode("utf-16-le")
        return bytes([2 + len(raw), DescriptorType.STRING]) + raw

    def handle(self, packet: Packet) -> list[Packet] | None:
        """Replies of a device with its own function (a stick); None: the generic answers."""
        return None

    def descriptor(self, value: int) -> bytes | None:
        dtype, index = value >> 8, value & 0xFF
        if dtype == DescriptorType.DEVICE:
            return self.device_descriptor()
        if dtype == DescriptorType.CONFIGURATION and index == 0:
            return self.config_descriptor()
        if dtype == DescriptorType.STRING:
            return self.string_descriptor(index)
        return None


REQUEST_CLEAR_FEATURE = 0x01
REQUESTTYPE_OUT_STANDARD_ENDPOINT = 0x02
FEATURE_ENDPOINT_HALT = 0
BULK_IN, BULK_OUT = 0x81, 0x02
HIGH_SPEED_BULK_PACKET = 512


@dataclass
class MassStorageStick(FakeDevice):
    """A USB stick: one mass-storage interface (08:06:50, Bulk-Only), bulk endpoints 0x81 and
    0x02, its blocks in ``transport``'s ScsiDisk (an image file for `usbgate simulate-stick`).

    Answers as usbredirhost does for a real stick: bulk packets carry the transfer (STALL for
    a halted endpoint), CLEAR_FEATURE(ENDPOINT_HALT) clears a halt, the class requests Get Max
    LUN and Bulk-Only Mass Storage Reset go to the transport, usbredir reset resets it.
    """

    transport: BulkOnlyTransport | None = None
    bulk_packets: int = 0

    def ep_info(self) -> EpInfo:
        types = [EndpointType.INVALID] * 32
        types[0] = types[16] = EndpointType.CONTROL
        types[_ep_index(BULK_IN)] = types[_ep_index(BULK_OUT)] = EndpointType.BULK
        sizes = [0] * 32
        sizes[0] = sizes[16] = 64
        sizes[_ep_index(BULK_IN)] = sizes[_ep_index(BULK_OUT)] = HIGH_SPEED_BULK_PACKET
        return EpInfo(tuple(types), (0,) * 32, (0,) * 32, tuple(sizes))

    def config_descriptor(self) -> bytes:
        cls, sub, proto = (self.descriptor_interfaces or self.interfaces)[0]
        body = struct.pack("<BBBBBBBBB", 9, DescriptorType.INTERFACE, 0, 0, 2, cls, sub, proto, 0)
        for ep in (BULK_IN, BULK_OUT):
            body += struct.pack("<BBBBHB", 7, DescriptorType.ENDPOINT, ep, 2,
                                HIGH_SPEED_BULK_PACKET, 0)  # fmt: skip
        head = struct.pack("<BBHBBBBB", 9, DescriptorType.CONFIGURATION, 9 + len(body), 1, 1, 0,
                           0x80, 50)  # fmt: skip
        return head + body

    def handle(self, packet: Packet) -> list[Packet] | None:
        bot = self.transport
        if bot is None:
            return None
        match packet:
            case BulkPacket(endpoint=ep) if ep == BULK_IN:
                self.bulk_packets += 1
                outcome, data = bot.bulk_in(packet.length)
                status = Status.SUCCESS if outcome is Transfer.OK else Status.STALL
                return [BulkPacket(ep, status, len(data), packet.stream_id, data, id=packet.id)]
            case BulkPacket(endpoint=ep) if ep == BULK_OUT:
                self.bulk_packets += 1
                outcome = bot.bulk_out(packet.data)
                ok = outcome is Transfer.OK
                return [BulkPacket(ep, Status.SUCCESS if ok else Status.STALL,
                                   packet.length if ok else 0, packet.stream_id,
                                   id=packet.id)]  # fmt: skip
            case BulkPacket(endpoint=ep):
                return [BulkPacket(ep, Status.STALL, 0, packet.stream_id, id=packet.id)]
            case ControlPacket() if _is_clear_halt(packet):
                bot.clear_halt(bool(packet.index & 0x80))
                return [control_reply(packet, Status.SUCCESS, b"")]
            case ControlPacket(request=0xFE, requesttype=0xA1):  # Get Max LUN
                return [control_reply(packet, Status.SUCCESS, b"\0"[: packet.length])]
            case ControlPacket(request=0xFF, requesttype=0x21):  # Bulk-Only Mass Storage Reset
                bot.reset()
                return [control_reply(packet, Status.SUCCESS, b"")]
            case Reset():
                bot.reset()
                bot.clear_halt(True)
                bot.clear_halt(False)
                return []
        return None

    @classmethod
    def from_image(cls, path: str, *, vendor_id: int = 0x0781, product_id: int = 0x5567,
                   serial: str = "4C530001", read_only: bool = False
                   ) -> MassStorageStick:  # fmt: skip
        """A stick whose blocks are the image file at ``path`` (OSError if it cannot be opened;
        ValueError if it is smaller than one block)."""
        store = FileStore(path, read_only=read_only)
        try:
            disk = ScsiDisk(store, Identity(serial=serial), read_only=read_only)
        except ValueError:
            store.close()
            raise
        return cls(vendor_id, product_id, serial=serial, product_name="Simulated Stick",
                   transport=BulkOnlyTransport(disk))  # fmt: skip


def _is_clear_halt(packet: ControlPacket) -> bool:
    return (packet.request, packet.requesttype, packet.value) == (
        REQUEST_CLEAR_FEATURE,
        REQUESTTYPE_OUT_STANDARD_ENDPOINT,
        FEATURE_ENDPOINT_HALT,
    )


def _ep_index(endpoint: int) -> int:
    """usbredir's endpoint index: IN endpoints 16-31, OUT endpoints 0-15."""
    return ((endpoint & 0x80) >> 3) | (endpoint & 0x0F)


@dataclass
class FakeOwner:
    """The owner's side of one usbredir connection, driven by asyncio."""

    device: FakeDevice
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: Connection = field(default_factory=lambda: Connection(Role.HOST))
    received: list[Packet] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    filter_rejected: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, address: str, device: FakeDevice, *, announce: bool = True
                      ) -> FakeOwner:  # fmt: skip
        kind, _, rest = address.partition(":")
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(rest)
        else:
            host, _, port = rest.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
        owner = cls(device, reader, writer)
        owner.write(Hello("fake-owner 1.0", (int(ALL_CAPABILITIES),)))
        await owner.wait_for_hello()
        owner.task = asyncio.create_task(owner.serve())
        if announce:
            owner.announce()
        return owner

    def write(self, packet: Packet) -> None:
        self.writer.write(self.conn.send(packet))

    async def wait_for_hello(self) -> None:
        while self.conn.peer_hello is None:
            data = await self.reader.read(65536)
            self.conn.receive_data(data)
            event = self.conn.next_event()
            if event is CLOSED:
                raise ConnectionError("closed before hello")

    def announce(self) -> None:
        self.write(self.device.interface_info())
        self.write(self.device.ep_info())
        self.write(self.device.device_connect())

    def unplug(self) -> None:
        self.write(DeviceDisconnect())

    async def serve(self) -> None:
        try:
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    data = await self.reader.read(65536)
                    self.conn.receive_data(data)
                    continue
                if event is CLOSED:
                    break
                assert not isinstance(event, type(NEED_DATA))
                self.received.append(event)
                self.answer(event)
                await self.writer.drain()
        except (ConnectionError, ProtocolError):
            pass
        finally:
            self.closed.set()
            with contextlib.suppress(Exception):
                self.writer.close()

    def answer(self, packet: Packet) -> None:
        d = self.device
        if d.mute and isinstance(packet, ControlPacket):
            return
        if (replies := d.handle(packet)) is not None:
            for reply in replies:
                self.write(reply)
            return
        match packet:
            case ControlPacket(endpoint=ep, request=0x06, value=value, length=length) if ep & 0x80:
                data = d.descriptor(value)
                if data is None:
                    self.write(control_reply(packet, Status.STALL, b""))
                else:
                    self.write(control_reply(packet, Status.SUCCESS, data[:length]))
            case ControlPacket(endpoint=ep) if ep & 0x80:
                self.write(control_reply(packet, Status.SUCCESS, b"\0" * min(packet.length, 2)))
            case ControlPacket():
                self.write(control_reply(packet, Status.SUCCESS, b""))
            case SetConfiguration(configuration=value):
                self.write(d.ep_info())
                self.write(d.interface_info())
                self.write(ConfigurationStatus(Status.SUCCESS, value, id=packet.id))
            case GetConfiguration():
                self.write(ConfigurationStatus(Status.SUCCESS, 1, id=packet.id))
            case SetAltSetting(interface=i, alt=alt):
                self.write(d.ep_info())
                self.write(d.interface_info())
                self.write(AltSettingStatus(Status.SUCCESS, i, alt, id=packet.id))
            case GetAltSetting(interface=i):
                self.write(AltSettingStatus(Status.SUCCESS, i, 0, id=packet.id))
            case StartInterruptReceiving(endpoint=ep) | StopInterruptReceiving(endpoint=ep):
                self.write(InterruptReceivingStatus(Status.SUCCESS, ep, id=packet.id))
            case BulkPacket(endpoint=ep) if ep & 0x80:
                self.write(BulkPacket(ep, Status.STALL, 0, packet.stream_id, id=packet.id))
            case BulkPacket(endpoint=ep):
                self.write(BulkPacket(ep, Status.SUCCESS, packet.length, packet.stream_id,
                                      id=packet.id))  # fmt: skip
            case InterruptPacket(endpoint=ep):
                self.write(InterruptPacket(ep, Status.SUCCESS, packet.length, id=packet.id))
            case _:
                if packet.TYPE.name == "FILTER_REJECT":
                    self.filter_rejected.set()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await self.writer.wait_closed()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def control_reply(request: ControlPacket, status: int, data: bytes) -> ControlPacket:
    return ControlPacket(
        request.endpoint, request.request, request.requesttype, status, request.value,
        request.index, len(data), data, id=request.id,
    )  # fmt: skip
