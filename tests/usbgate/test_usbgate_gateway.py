"""usbgate end to end: a fake device owner -> `usbgate run` -> a real QEMU usb-redir device.

The fixtures (conftest.py) give each module one QEMU (two usb-redir slots), one keystore and
one `usbgate run` process; every test sets the VM's rules through the keystore repository, as
`vmshield usb` does, and watches QEMU over QMP and its debug=3 stderr. Revocation is in
test_usbgate_revocation.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keystore.sqlite import audit as keystore_audit
from scripts.lab.qmp import QEMU, QemuWithRedir
from tests.support.usbgate_qemu import (
    AttachWatch,
    Keystore,
    attaching_lines,
    offer,
    wait_detached,
)
from usbgate.addresses import parse_address
from usbgate.gateway import Gateway
from usbgate.rules.policy import Rule, parse_rule
from usbgate.rules.qemu_filter import qemu_filter_value, usbredir_filter_string
from usbgate.simulator import HID_KEYBOARD, MASS_STORAGE, FakeDevice, FakeOwner
from usbgate.sources import MemoryAuditSink, MemoryRuleSource
from usbgate.usbredir.packets import BulkPacket, DeviceDisconnectAck, FilterFilter

VMSHIELD = Path(sys.executable).with_name("vmshield")

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]


# --- tests ------------------------------------------------------------------------------------


def test_allowed_device_attaches(qemu: QemuWithRedir, keystore: Keystore, gateway: Any) -> None:
    keystore.set_rules("allow id 0781:5567 with-interface 08:06:50")

    async def scenario() -> None:
        owner = await offer(gateway, FakeDevice())
        await asyncio.to_thread(qemu.wait_attached, True, 0)
        await owner.close()

    asyncio.run(scenario())
    wait_detached(qemu)
    assert attaching_lines(qemu, "0781:5567")
    [row] = keystore.wait_audit("usb.allowed", "0781:5567")[-1:]
    assert row["device"]["serial"] == "4C530001"  # probed from the string descriptor
    assert keystore.wait_audit("usb.detached", "0781:5567")


def _status_devices(keystore: Keystore, gateway: Any, want: int) -> list[dict[str, Any]]:
    """The devices `vmshield status` shows for the gateway, once it shows `want` of them."""
    deadline = time.monotonic() + 15
    while True:
        out = subprocess.run(
            [str(VMSHIELD), "status", "--json", "--db", str(keystore.path)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        [gate] = [g for g in json.loads(out)["usbgates"] if g["pid"] == gateway["proc"].pid]
        if gate["devices"] is not None and len(gate["devices"]) == want:
            return list(gate["devices"])
        assert time.monotonic() < deadline, gate
        time.sleep(0.1)


def test_status_shows_the_devices_attached_through_a_usbgate(
    qemu: QemuWithRedir, keystore: Keystore, gateway: Any
) -> None:
    keystore.set_rules("allow id 0781:5567 with-interface 08:06:50")
    assert _status_devices(keystore, gateway, 0) == []

    async def scenario() -> list[dict[str, Any]]:
        owner = await offer(gateway, FakeDevice())
        await asyncio.to_thread(qemu.wait_attached, True, 0)
        shown = await asyncio.to_thread(_status_devices, keystore, gateway, 1)
        await owner.close()
        return shown

    [device] = asyncio.run(scenario())
    assert (device["vid_pid"], device["serial"], device["slot"]) == ("0781:5567", "4C530001", 0)
    assert device["owner"].startswith("127.0.0.1:") and device["since"] <= time.time()
    assert stat.S_IMODE(os.stat(gateway["state"]).st_mode) == 0o600
    wait_detached(qemu)
    assert _status_devices(keystore, gateway, 0) == []


@pytest.mark.parametrize(
    ("rules", "device", "action", "closes"),
    [
        # composite storage + keyboard: the keyboard interface is not whitelisted
        (("allow id 1111:2222 with-interface 08:*:*",),
         FakeDevice(0x1111, 0x2222, interfaces=(MASS_STORAGE, HID_KEYBOARD)), "block", False),
        # not listed at all: default block
        (("allow id 0781:5567",), FakeDevice(0x1111, 0x2223), "block", False),
        # explicitly rejected: the owner is told and the connection closed
        (("reject id 1111:*", "allow id *:*"), FakeDevice(0x1111, 0x2224), "reject", True),
        # wrong serial
        (('allow id 1111:2225 serial "OTHER"',), FakeDevice(0x1111, 0x2225), "block", False),
    ],
    ids=["composite", "unlisted", "reject", "serial"],
)  # fmt: skip
def test_denied_device_never_reaches_qemu(
    qemu: QemuWithRedir, keystore: Keystore, gateway: Any,
    rules: tuple[str, ...], device: FakeDevice, action: str, closes: bool,
) -> None:  # fmt: skip
    keystore.set_rules(*rules)
    vid_pid = f"{device.vendor_id:04x}:{device.product_id:04x}"
    watch = AttachWatch(qemu)

    async def scenario() -> FakeOwner:
        owner = await offer(gateway, device)
        await asyncio.wait_for(owner.filter_rejected.wait(), 5)
        await asyncio.sleep(0.3)  # QEMU would have attached by now if it had seen it
        if closes:
            await asyncio.wait_for(owner.closed.wait(), 2)
        else:
            assert not owner.closed.is_set()
        await owner.close()
        return owner

    owner = asyncio.run(scenario())
    watch.stop()
    assert watch.first(True) is None, "QEMU attached the denied device"
    assert attaching_lines(qemu, vid_pid) == []
    assert not any(isinstance(p, type(device.device_connect())) for p in owner.received)
    [row] = keystore.wait_audit("usb.denied", vid_pid)
    assert row["action"] == action


def test_blocked_device_unplugged_then_an_allowed_one_on_the_same_connection(
    qemu: QemuWithRedir, keystore: Keystore, gateway: Any
) -> None:
    keystore.set_rules("allow id 0781:5567")

    async def scenario() -> FakeOwner:
        owner = await offer(gateway, FakeDevice(0x1111, 0x2226))
        await asyncio.wait_for(owner.filter_rejected.wait(), 5)
        owner.unplug()
        for _ in range(100):  # the gateway acknowledges what QEMU never saw
            if any(isinstance(p, DeviceDisconnectAck) for p in owner.received):
                break
            await asyncio.sleep(0.01)
        owner.device = FakeDevice()
        owner.announce()
        await asyncio.to_thread(qemu.wait_attached, True, 0, 10.0)
        await owner.close()
        return owner

    owner = asyncio.run(scenario())
    wait_detached(qemu)
    assert any(isinstance(p, DeviceDisconnectAck) for p in owner.received)
    assert attaching_lines(qemu, "1111:2226") == []


def test_device_contradicting_its_descriptors_is_denied(
    qemu: QemuWithRedir, keystore: Keystore, gateway: Any
) -> None:
    keystore.set_rules("allow id 2222:3333")
    liars = [
        FakeDevice(0x2222, 0x3333, descriptor_vendor_id=0x6666),  # announces an allowed VID
        FakeDevice(
            0x2222,
            0x3333,
            serial=None,
            interfaces=(MASS_STORAGE,),
            descriptor_interfaces=(HID_KEYBOARD,),
        ),  # hides a keyboard
    ]
    watch = AttachWatch(qemu)

    async def scenario(device: FakeDevice) -> None:
        owner = await offer(gateway, device)
        await asyncio.wait_for(owner.closed.wait(), 5)
        assert owner.filter_rejected.is_set()
        await owner.close()

    for liar in liars:
        asyncio.run(scenario(liar))
    watch.stop()
    assert watch.first(True) is None
    assert attaching_lines(qemu, "2222:3333") == []
    rows = keystore.wait_audit("usb.denied", "2222:3333", count=2)
    assert "contradict" in rows[0]["reason"] and "6666" in rows[0]["reason"]
    assert "in no configuration descriptor" in rows[1]["reason"]


def test_malformed_and_truncated_streams_close_only_that_connection(
    qemu: QemuWithRedir, keystore: Keystore, gateway: Any
) -> None:
    keystore.set_rules("allow id 0781:5567")

    async def garbage_after_hello() -> None:
        owner = await FakeOwner.connect(gateway["address"], FakeDevice(), announce=False)
        owner.writer.write(b"\xde\xad\xbe\xef" * 8)
        await asyncio.wait_for(owner.closed.wait(), 5)

    async def data_before_any_device() -> None:
        owner = await FakeOwner.connect(gateway["address"], FakeDevice(), announce=False)
        owner.write(BulkPacket(0x81, 0, 4, data=b"evil"))  # well-formed, but out of turn
        await asyncio.wait_for(owner.closed.wait(), 5)

    async def truncated_announcement() -> None:
        owner = await FakeOwner.connect(gateway["address"], FakeDevice(), announce=False)
        whole = owner.conn.send(FakeDevice().interface_info())
        owner.writer.write(whole[:40])
        await owner.writer.drain()
        owner.writer.write_eof()
        await asyncio.wait_for(owner.closed.wait(), 5)

    async def garbage_while_attached() -> None:
        owner = await offer(gateway, FakeDevice())
        await asyncio.to_thread(qemu.wait_attached, True, 0, 10.0)
        owner.writer.write(b"\x00\x00\x00\x00\x07\x00\x00\x00" + b"\x00" * 8 + b"junk!!!")
        await asyncio.wait_for(owner.closed.wait(), 5)
        await asyncio.to_thread(qemu.wait_attached, False, 0)

    scenarios = (garbage_after_hello, data_before_any_device, truncated_announcement,
                 garbage_while_attached)  # fmt: skip
    for scenario in scenarios:
        asyncio.run(scenario())
        assert gateway["proc"].poll() is None, "usbgate died"
        assert qemu.running(), "QEMU stopped"
    deadline = time.monotonic() + 5
    while True:
        malformed = [d for a, d, _ in keystore.audit_rows() if a == "usb.malformed"]
        if len(malformed) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(malformed) == 4, malformed
    assert "unknown packet type" in malformed[0]["error"]
    assert "BULK_PACKET before any device" in malformed[1]["error"]
    assert "ends inside a packet" in malformed[2]["error"]

    async def still_works() -> None:
        owner = await offer(gateway, FakeDevice())
        await asyncio.to_thread(qemu.wait_attached, True, 0, 10.0)
        await owner.close()

    asyncio.run(still_works())
    wait_detached(qemu)


def test_two_slots_and_a_full_gateway(
    qemu: QemuWithRedir, keystore: Keystore, gateway: Any
) -> None:
    keystore.set_rules("allow id 0781:*")

    async def scenario() -> None:
        first = await offer(gateway, FakeDevice(product_id=0x0001))
        second = await offer(gateway, FakeDevice(product_id=0x0002))
        await asyncio.to_thread(qemu.wait_attached, True, 0, 10.0)
        await asyncio.to_thread(qemu.wait_attached, True, 1, 10.0)
        with pytest.raises(ConnectionError):  # no free slot: hung up before any hello
            await offer(gateway, FakeDevice(product_id=0x0003))
        for owner in (first, second):
            await owner.close()

    asyncio.run(scenario())
    wait_detached(qemu)
    assert attaching_lines(qemu, "0781:0001") and attaching_lines(qemu, "0781:0002")
    assert attaching_lines(qemu, "0781:0003") == []


def test_unreachable_qemu_and_a_unix_listener(workdir: Path) -> None:
    """An owner on a unix socket; QEMU's chardev is not there: audited, closed, still serving."""
    audit = MemoryAuditSink()
    listen = parse_address(f"unix:{workdir}/gw-unix.sock")
    gateway = Gateway("vmx", listen, [parse_address(f"unix:{workdir}/absent.sock")],
                      MemoryRuleSource({"vmx": []}), audit)  # fmt: skip

    async def scenario() -> None:
        await gateway.start()
        try:
            for _ in range(2):
                with pytest.raises(ConnectionError):
                    await FakeOwner.connect(str(listen), FakeDevice())
        finally:
            await gateway.stop()

    asyncio.run(scenario())
    assert audit.actions() == ["usb.error", "usb.error"]
    assert "cannot reach QEMU" in audit.rows[0][2]["reason"]


def test_silent_device_is_denied_after_the_probe_timeout(qemu: QemuWithRedir) -> None:
    audit = MemoryAuditSink()
    gateway = Gateway("vmq", parse_address("tcp:127.0.0.1:0"),
                      [parse_address("unix:" + qemu.chardev_path(1))],
                      MemoryRuleSource({"vmq": [parse_rule("allow id *:*")]}), audit,
                      probe_timeout=0.3)  # fmt: skip

    async def scenario() -> None:
        await gateway.start()
        try:
            owner = await FakeOwner.connect(str(gateway.bound_address),
                                            FakeDevice(0x3333, 0x4444, mute=True))  # fmt: skip
            await asyncio.wait_for(owner.closed.wait(), 5)
            assert owner.filter_rejected.is_set()
            await owner.close()
        finally:
            await gateway.stop()

    asyncio.run(scenario())
    assert audit.actions() == ["usb.denied"]
    assert "no answer in time" in audit.rows[0][2]["reason"]
    assert attaching_lines(qemu, "3333:4444") == []


def test_audit_chain_still_verifies(keystore: Keystore, gateway: Any) -> None:
    assert keystore.audit_rows(), "usbgate wrote no audit rows"
    result = keystore_audit.verify(keystore.path)
    assert result.ok, result.problems


def test_generated_static_filter_in_real_qemu(workdir: Path) -> None:
    """QEMU's own filter, generated from the rules, refuses what the rules do not allow."""
    rules = [parse_rule("allow id 0781:5567 with-interface 08:*:*"), parse_rule("block id *:*")]
    value = qemu_filter_value(rules)
    vm = QemuWithRedir(workdir / "filtered", slots=1, filter=value)
    vm.workdir.mkdir()
    vm.start()
    try:

        async def offer_directly(device: FakeDevice) -> FakeOwner:
            owner = await FakeOwner.connect("unix:" + vm.chardev_path(0), device)
            await asyncio.sleep(0.5)
            await owner.close()
            return owner

        watch = AttachWatch(vm)
        refused = asyncio.run(offer_directly(FakeDevice(0x4444, 0x5555)))
        watch.stop()
        assert refused.filter_rejected.is_set()
        assert watch.first(True) is None
        # QEMU logs "attaching" before it applies its filter, then refuses
        assert vm.lines("rejected by device filter")
        asyncio.run(offer_directly(FakeDevice()))
        assert attaching_lines(vm, "0781:5567")
        assert len(vm.lines("rejected by device filter")) == 1
        # through a gateway, the owner still learns QEMU's filter (filter_filter is relayed)
        asyncio.run(relayed_filter(vm, rules))
    finally:
        vm.stop()


async def relayed_filter(vm: QemuWithRedir, rules: list[Rule]) -> None:
    gateway = Gateway("vmf", parse_address("tcp:127.0.0.1:0"),
                      [parse_address("unix:" + vm.chardev_path(0))],
                      MemoryRuleSource({"vmf": rules}), MemoryAuditSink())  # fmt: skip
    await gateway.start()
    try:
        owner = await FakeOwner.connect(str(gateway.bound_address), FakeDevice())
        await asyncio.to_thread(vm.wait_attached, True, 0, 10.0)
        filters = [p for p in owner.received if isinstance(p, FilterFilter)]
        assert filters and filters[0].rules == usbredir_filter_string(rules)
        await owner.close()
    finally:
        await gateway.stop()
