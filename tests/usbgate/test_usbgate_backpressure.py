"""A session's flow control: a side that stops reading stops usbgate reading the other side.

The session feeds the relay from the transports' own callbacks (no task per read), so nothing
waits on a drain(): when QEMU stops reading, usbgate must stop reading the owner instead of
buffering everything the owner sends. QEMU here is a usb-guest peer that answers the hellos,
takes the announcement and then reads nothing (a QEMU whose guest is stopped).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from scripts.lab.qmp import short_tmpdir
from usbgate.addresses import parse_address
from usbgate.gateway import Gateway
from usbgate.rules.policy import parse_rules
from usbgate.simulator import BULK_IN, FakeOwner, MassStorageStick
from usbgate.sources import MemoryAuditSink, MemoryRuleSource
from usbgate.state import State
from usbgate.usbredir.codec import NEED_DATA, Connection
from usbgate.usbredir.packets import BulkPacket, DeviceConnect, Hello
from usbgate.usbredir.wire import ALL_CAPABILITIES, Role

CHUNK = 120 * 1024


async def stalled_copy(workdir: Path) -> tuple[int, int]:
    """(bytes the owner wrote before usbgate stopped reading it, usbgate's buffered bytes)."""
    announced = asyncio.Event()

    async def qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(Role.GUEST)
        writer.write(conn.send(Hello("stalled qemu", (int(ALL_CAPABILITIES),))))
        while True:
            while (event := conn.next_event()) is NEED_DATA:
                conn.receive_data(await reader.read(65536))
            if isinstance(event, DeviceConnect):
                break
        announced.set()
        await asyncio.sleep(60)  # reads nothing more

    server = await asyncio.start_unix_server(qemu, str(workdir / "q.sock"))
    gateway = Gateway("bp", parse_address(f"unix:{workdir / 'g.sock'}"),
                      [parse_address(f"unix:{workdir / 'q.sock'}")],
                      MemoryRuleSource({"bp": parse_rules("allow id *:*")}),
                      MemoryAuditSink())  # fmt: skip
    await gateway.start()
    owner = await FakeOwner.connect(f"unix:{workdir / 'g.sock'}", MassStorageStick())
    try:
        await asyncio.wait_for(announced.wait(), 10)
        [session] = gateway.sessions.values()
        assert session.state is State.ATTACHED
        data = bytes(CHUNK)
        written = 0
        for _ in range(2000):  # up to 234 MiB, far more than any socket buffers
            owner.write(BulkPacket(BULK_IN, 0, CHUNK, data=data, id=written))
            written += CHUNK
            if owner.writer.transport.get_write_buffer_size() > 16 * CHUNK:
                break  # usbgate stopped reading the owner: its bytes pile up on its side
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        buffered = session.qemu_writer.transport.get_write_buffer_size()
        return written, buffered
    finally:
        owner.writer.transport.abort()  # its unsent bytes would never leave
        await owner.close()
        await gateway.stop()
        server.close()


def test_a_qemu_that_stops_reading_stops_usbgate_reading_the_owner() -> None:
    written, buffered = asyncio.run(stalled_copy(Path(short_tmpdir())))
    assert written < 200 * 1024 * 1024, "usbgate kept reading the owner"
    assert buffered < 4 * 1024 * 1024, f"usbgate buffered {buffered} bytes for QEMU"
