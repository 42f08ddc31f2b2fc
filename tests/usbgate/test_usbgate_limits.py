"""Issue 12 finding 11: idle connections, one peer's many connections and audit floods are bounded.

A silent connection must not hold a usb-redir slot (hello timeout), one peer cannot take every
slot (per-peer limit), and refused connections and a slow audit store cannot grow memory or
the audit trail without bound (aggregated refusal rows, a bounded audit queue).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from scripts.lab.qmp import QEMU, QemuWithRedir
from usbgate import auditing
from usbgate.addresses import parse_address
from usbgate.auditing import QueuedAuditSink, Refusals
from usbgate.gateway import Gateway
from usbgate.rules.policy import parse_rules
from usbgate.simulator import FakeDevice, FakeOwner
from usbgate.sources import MemoryAuditSink, MemoryRuleSource

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]


def one_slot_gateway(qemu: QemuWithRedir, audit: MemoryAuditSink, **kw: Any) -> Gateway:
    return Gateway("vml", parse_address("tcp:127.0.0.1:0"),
                   [parse_address("unix:" + qemu.chardev_path(1))],
                   MemoryRuleSource({"vml": parse_rules("allow id 0781:5567")}), audit,
                   **kw)  # fmt: skip


async def idle_connection(gateway: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = gateway.bound_address
    assert address.host is not None and address.port is not None
    return await asyncio.open_connection(address.host, address.port)


def test_a_silent_connection_holds_no_slot_and_is_closed(qemu: QemuWithRedir) -> None:
    audit = MemoryAuditSink()
    gateway = one_slot_gateway(qemu, audit, hello_timeout=0.5)

    async def scenario() -> None:
        await gateway.start()
        try:
            reader, writer = await idle_connection(gateway)  # says nothing
            await asyncio.sleep(0.1)
            owner = await FakeOwner.connect(str(gateway.bound_address), FakeDevice())
            await asyncio.to_thread(qemu.wait_attached, True, 1, 10.0)  # the one slot is free
            assert await asyncio.wait_for(reader.read(), 2) == b""  # the idle one was hung up
            writer.close()
            await owner.close()
            await asyncio.to_thread(qemu.wait_attached, False, 1)
        finally:
            await gateway.stop()

    asyncio.run(scenario())
    denied = [d for a, _, d in audit.rows if a == "usb.denied"]
    assert [d["reason"] for d in denied] == ["no usbredir hello within 0.5 s"]
    assert denied[0]["peer"] == "127.0.0.1"


def test_a_hello_without_a_device_does_not_keep_the_slot(qemu: QemuWithRedir) -> None:
    """Issue 20 C: an owner that says hello and announces nothing held its slot forever."""
    audit = MemoryAuditSink()
    gateway = one_slot_gateway(qemu, audit, idle_timeout=0.5)

    async def scenario() -> None:
        await gateway.start()
        try:
            idle = await FakeOwner.connect(str(gateway.bound_address), FakeDevice(),
                                           announce=False)  # fmt: skip
            await asyncio.wait_for(idle.closed.wait(), 5)  # hung up after the idle timeout
            owner = await FakeOwner.connect(str(gateway.bound_address), FakeDevice())
            await asyncio.to_thread(qemu.wait_attached, True, 1, 10.0)  # the slot is free
            await asyncio.sleep(0.7)  # an attached device is not idle
            assert qemu.attached(1) and not owner.closed.is_set()
            await owner.close()
            await idle.close()
            await asyncio.to_thread(qemu.wait_attached, False, 1)
        finally:
            await gateway.stop()

    asyncio.run(scenario())
    denied = [d for a, _, d in audit.rows if a == "usb.denied"]
    assert [d["reason"] for d in denied] == ["no device announced within 0.5 s"]


def test_one_peer_cannot_take_every_slot_and_its_refusals_are_aggregated(
    qemu: QemuWithRedir,
) -> None:
    audit = MemoryAuditSink()
    gateway = Gateway("vmp", parse_address("tcp:127.0.0.1:0"),
                      [parse_address("unix:" + qemu.chardev_path(n)) for n in (0, 1)],
                      MemoryRuleSource({"vmp": parse_rules("allow id 0781:*")}), audit,
                      max_per_peer=1, refusal_window=60)  # fmt: skip

    async def scenario() -> None:
        await gateway.start()
        try:
            owner = await FakeOwner.connect(str(gateway.bound_address), FakeDevice())
            await asyncio.to_thread(qemu.wait_attached, True, 0, 10.0)
            for _ in range(21):  # slot 1 is free, but this peer already has its one connection
                with pytest.raises(ConnectionError):
                    await FakeOwner.connect(str(gateway.bound_address),
                                            FakeDevice(product_id=0x0002))  # fmt: skip
            assert not qemu.attached(1)
            await owner.close()
            await asyncio.to_thread(qemu.wait_attached, False, 0)
        finally:
            await gateway.stop()

    asyncio.run(scenario())
    denied = [d for a, _, d in audit.rows if a == "usb.denied"]
    assert len(denied) == 2, denied  # 21 refusals: the first at once, then one row for 20
    assert denied[0]["reason"] == "more than 1 connection(s) at once from 127.0.0.1"
    assert denied[1]["count"] == 20
    assert denied[1]["summary"].startswith("20 connections from 127.0.0.1 refused in ")


def test_denials_of_a_replugged_device_are_aggregated(qemu: QemuWithRedir) -> None:
    """Issue 20 C: every denial of a device was a row: an owner re-plugging a blocked stick
    in a loop grew the keystore without bound. Past a burst, a window's denials are one row."""
    audit = MemoryAuditSink()
    gateway = one_slot_gateway(qemu, audit, refusal_window=60)
    plugs = 40

    async def scenario() -> None:
        await gateway.start()
        try:
            blocked = FakeDevice(product_id=0x0002)
            owner = await FakeOwner.connect(str(gateway.bound_address), blocked, announce=False)
            for _ in range(plugs):
                owner.filter_rejected.clear()
                owner.announce()  # no rule matches: blocked, the owner is told
                await asyncio.wait_for(owner.filter_rejected.wait(), 5)
                owner.unplug()
            await asyncio.sleep(0.2)
            assert not qemu.attached(1)
            await owner.close()
        finally:
            await gateway.stop()

    asyncio.run(scenario())
    denied = [d for a, _, d in audit.rows if a == "usb.denied"]
    burst = auditing.DENIAL_BURST
    assert len(denied) == burst + 1, denied
    assert all(d["device"] == denied[0]["device"] for d in denied)
    assert denied[-1]["count"] == plugs - burst
    assert denied[-1]["summary"].startswith(f"{plugs - burst} more denials of ")


def test_refusal_rows_per_window() -> None:
    audit, now = MemoryAuditSink(), [0.0]
    refusals = Refusals(audit, "vm", window=10, clock=lambda: now[0])
    for t in range(25):  # one refusal a second from one peer, and one from another
        now[0] = float(t)
        refusals.refused("usb.denied", "10.0.0.1", "every usb-redir slot is in use")
    refusals.refused("usb.denied", "10.0.0.2", "every usb-redir slot is in use")
    refusals.flush(everything=True)
    rows = [(d["peer"], d.get("count")) for _, _, d in audit.rows]
    assert rows == [("10.0.0.1", None), ("10.0.0.1", 9), ("10.0.0.1", None), ("10.0.0.1", 9),
                    ("10.0.0.1", None), ("10.0.0.2", None), ("10.0.0.1", 4)]  # fmt: skip


class GatedSink(QueuedAuditSink):
    """A store that cannot write until ``gate`` opens."""

    def __init__(self, max_queued: int, max_per_vm: int | None = None) -> None:
        self.gate, self.written = threading.Event(), []
        super().__init__(max_queued=max_queued, max_per_vm=max_per_vm)

    def _write(self, action: str, vm: str, detail: dict[str, Any]) -> None:
        self.gate.wait()
        self.written.append((action, vm, detail))


def test_a_slow_audit_store_cannot_grow_the_queue_without_bound() -> None:
    sink = GatedSink(max_queued=5)
    for n in range(1000):
        sink.record("usb.denied", "vm", {"n": n})
    assert sink._queue.qsize() <= 5
    sink.gate.set()
    sink.close()
    actions = [a for a, _, _ in sink.written]
    assert len(actions) <= 7 and actions.count("usb.audit.dropped") == 1
    [dropped] = [d for a, _, d in sink.written if a == "usb.audit.dropped"]
    assert dropped["count"] == 1000 - actions.count("usb.denied")  # every row accounted for


def test_a_flood_of_denials_cannot_push_out_the_attach_that_follows() -> None:
    """An owner plugs a blocked device in and out until the audit queue is full, then attaches
    the allowed one and is revoked: the usb.allowed and usb.revoked rows, which say what reached
    the guest, were counted away as "dropped". They wait for room instead."""
    sink = GatedSink(max_queued=5)
    for n in range(100):
        sink.record("usb.denied", "vm", {"n": n})
    threading.Timer(0.3, sink.gate.set).start()  # the store catches up while record waits
    sink.record("usb.allowed", "vm", {"device": "0781:5567"})
    sink.record("usb.revoked", "vm", {"device": "0781:5567"})
    sink.close()
    actions = [a for a, _, _ in sink.written]
    assert "usb.allowed" in actions and "usb.revoked" in actions
    assert actions.index("usb.allowed") < actions.index("usb.revoked")
    [dropped] = [d for a, _, d in sink.written if a == "usb.audit.dropped"]
    assert dropped["count"] == 100 - actions.count("usb.denied")


def test_one_vm_flooding_the_queue_cannot_have_another_vms_rows_dropped() -> None:
    """One usbgate for every VM shares one audit queue: a VM's share of it is bounded."""
    sink = GatedSink(max_queued=50, max_per_vm=5)
    for n in range(1000):
        sink.record("usb.malformed", "flooder", {"n": n})
    for n in range(5):  # its own share
        sink.record("usb.denied", "bystander", {"n": n})
    assert sink._queue.qsize() <= 5 + 5
    sink.gate.set()
    sink.close()
    mine = [d for a, vm, d in sink.written if vm == "bystander"]
    assert [d["n"] for d in mine] == list(range(5))  # none dropped, in order
    [dropped] = [(vm, d) for a, vm, d in sink.written if a == "usb.audit.dropped"]
    flooded = sum(1 for a, vm, _ in sink.written if a == "usb.malformed")
    assert dropped[0] == "flooder" and dropped[1]["count"] == 1000 - flooded
