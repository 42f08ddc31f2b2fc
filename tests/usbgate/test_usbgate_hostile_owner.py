"""Hostile owners against a real QEMU: what reaches QEMU is only what the policy judged.

A tap (a unix-socket relay between the gateway and QEMU's usb-redir chardev) decodes every
byte QEMU receives, so the tests see what QEMU was given, not only what the gateway says.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.lab.qmp import QEMU, QemuWithRedir, short_tmpdir
from tests.support.relay_harness import control_reply
from usbgate.addresses import parse_address
from usbgate.errors import ProtocolError
from usbgate.gateway import Gateway
from usbgate.relay import PROBE_ID_BASE
from usbgate.rules.policy import parse_rules
from usbgate.simulator import HID_KEYBOARD, FakeDevice, FakeOwner
from usbgate.sources import MemoryAuditSink, MemoryRuleSource
from usbgate.usbredir.codec import Connection, Sentinel
from usbgate.usbredir.descriptors import DescriptorType, interface_triples_in
from usbgate.usbredir.packets import ControlPacket, DeviceConnect, DeviceDisconnect, Hello, Packet
from usbgate.usbredir.wire import Role, Status

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]

# Issue 12 finding 2: storage is allowed, a keyboard interface anywhere is not.
RULES = "block with-interface 03:*:*\nallow id 0781:5567"


@pytest.fixture
def qemu() -> Iterator[QemuWithRedir]:
    """A QEMU of the test's own: its firmware enumerates USB (asks for descriptors) only while
    it boots, so each test needs a fresh one."""
    workdir = short_tmpdir()
    vm = QemuWithRedir(workdir, slots=2)
    vm.start()
    yield vm
    vm.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class Tap:
    """Relays gateway <-> QEMU on a unix socket and decodes what QEMU receives."""

    def __init__(self, path: str, qemu_path: str) -> None:
        self.path, self.qemu_path = path, qemu_path
        self.to_qemu: list[Packet] = []
        self.raw = {"to_qemu": bytearray(), "from_qemu": bytearray()}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, self.path)

    async def _accept(self, greader: asyncio.StreamReader, gwriter: asyncio.StreamWriter) -> None:
        qreader, qwriter = await asyncio.open_unix_connection(self.qemu_path)
        # QEMU's side of the stream (a usb-guest) and what it hears from usbgate (a usb-host)
        heard, said = Connection(Role.GUEST), Connection(Role.HOST)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       conn: Connection, record: bool) -> None:  # fmt: skip
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    self.raw["to_qemu" if record else "from_qemu"] += data
                    if not record and heard.our_hello is not None:
                        continue  # QEMU's hello is all this side needs
                    conn.receive_data(data)
                    while not isinstance(event := conn.next_event(), Sentinel):
                        if record:
                            self.to_qemu.append(event)
                        elif conn.peer_hello is not None and heard.our_hello is None:
                            heard.our_hello = conn.peer_hello  # QEMU's hello, for the caps
                            while not isinstance(late := heard.next_event(), Sentinel):
                                self.to_qemu.append(late)
                    await writer.drain()
            writer.close()

        down = asyncio.create_task(pipe(greader, qwriter, heard, True))
        up = asyncio.create_task(pipe(qreader, gwriter, said, False))
        self._tasks |= {down, up}
        await asyncio.gather(down, up, return_exceptions=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class KeyboardSmuggler(FakeOwner):
    """Answers the gateway's probe honestly as a storage stick; answers QEMU's requests for the
    configuration with a HID keyboard, under a changed wIndex (the finding's exact attack)."""

    lies: int = 0

    def answer(self, packet: Packet) -> None:
        if (
            isinstance(packet, ControlPacket)
            and packet.id < PROBE_ID_BASE
            and packet.request == 0x06
            and packet.value >> 8 == DescriptorType.CONFIGURATION
        ):
            keyboard = FakeDevice(interfaces=(HID_KEYBOARD,)).config_descriptor()
            self.lies += 1
            reply = control_reply(packet, Status.SUCCESS, keyboard[: packet.length],
                                  index=packet.index ^ 0x0409)  # fmt: skip
            self.write(reply)
            return
        super().answer(packet)


def decode_all(conn: Connection, pieces: list[bytes]) -> list[Packet]:
    out: list[Packet] = []
    for piece in pieces:
        conn.receive_data(piece)
        while not isinstance(event := conn.next_event(), Sentinel):
            out.append(event)
    return out


def host_side(tap: Tap) -> Connection:
    """usbgate's end towards QEMU, as it was: its own hello taken from the captured bytes."""
    conn = Connection(Role.HOST)
    [hello, *_] = decode_all(Connection(Role.GUEST), [bytes(tap.raw["to_qemu"])])
    assert isinstance(hello, Hello)
    conn.our_hello = hello
    return conn


def test_real_qemu_bytes_whole_byte_by_byte_and_with_trailing_garbage(
    qemu: QemuWithRedir,
) -> None:
    """h11 test_io style on what a real QEMU 7.2 sent (hello, filter, reset, GET_DESCRIPTORs)."""
    tap = Tap(str(Path(qemu.chardev_path(1)).with_name("tap2.sock")), qemu.chardev_path(1))
    rules = MemoryRuleSource({"vmb": parse_rules("allow id *:*")})
    gateway = Gateway("vmb", parse_address("tcp:127.0.0.1:0"), [parse_address(f"unix:{tap.path}")],
                      rules, MemoryAuditSink())  # fmt: skip

    async def scenario() -> None:
        await tap.start()
        await gateway.start()
        try:
            owner = await FakeOwner.connect(str(gateway.bound_address), FakeDevice())
            await asyncio.to_thread(qemu.wait_attached, True, 1, 10.0)
            async with asyncio.timeout(30):  # the firmware enumerates the device
                while not any(
                    isinstance(p, ControlPacket) and p.id < PROBE_ID_BASE for p in owner.received
                ):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            await owner.close()
            await asyncio.to_thread(qemu.wait_attached, False, 1, 5.0)
        finally:
            await gateway.stop()
            await tap.stop()

    asyncio.run(scenario())
    real = bytes(tap.raw["from_qemu"])
    whole = decode_all(host_side(tap), [real])
    assert isinstance(whole[0], Hello) and any(isinstance(p, ControlPacket) for p in whole)
    assert decode_all(host_side(tap), [real[i : i + 1] for i in range(len(real))]) == whole
    garbage = host_side(tap)
    got: list[Packet] = []
    with pytest.raises(ProtocolError):
        got += decode_all(garbage, [real, b"\xff" * 16])
    assert garbage.buffered == 16 and decode_all(host_side(tap), [real]) == whole


def qemu_saw_a_keyboard(tap: Tap) -> bool:
    return any(
        isinstance(p, ControlPacket) and (3, 1, 1) in interface_triples_in(p.data)
        for p in tap.to_qemu
    )


def test_a_reply_under_another_windex_cannot_smuggle_a_keyboard(qemu: QemuWithRedir) -> None:
    audit = MemoryAuditSink()
    tap = Tap(str(Path(qemu.chardev_path(1)).with_name("tap.sock")), qemu.chardev_path(1))
    gateway = Gateway("vmh", parse_address("tcp:127.0.0.1:0"), [parse_address(f"unix:{tap.path}")],
                      MemoryRuleSource({"vmh": parse_rules(RULES)}), audit)  # fmt: skip

    async def scenario() -> KeyboardSmuggler:
        await tap.start()
        await gateway.start()
        try:
            owner = await KeyboardSmuggler.connect(str(gateway.bound_address), FakeDevice())
            await asyncio.to_thread(qemu.wait_attached, True, 1, 10.0)  # allowed as storage
            await asyncio.wait_for(owner.closed.wait(), 30)  # QEMU asks, the owner lies: revoked
            await asyncio.to_thread(qemu.wait_attached, False, 1, 5.0)
            return owner
        finally:
            await gateway.stop()
            await tap.stop()

    owner = asyncio.run(scenario())
    assert owner.lies >= 1, "QEMU never asked for the configuration: the attack was not tried"
    assert owner.filter_rejected.is_set(), "the owner was not told (filter_reject)"
    assert not qemu_saw_a_keyboard(tap), "QEMU was given the keyboard configuration"
    assert any(isinstance(p, DeviceConnect) for p in tap.to_qemu)
    assert isinstance(tap.to_qemu[-1], DeviceDisconnect), "no synthetic device_disconnect"
    assert audit.actions() == ["usb.allowed", "usb.revoked"], audit.rows
    assert "does not match its request" in audit.rows[1][2]["reason"]
