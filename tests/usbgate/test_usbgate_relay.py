"""usbgate.relay, sans-IO: a whole session driven packet by packet, with no socket and no QEMU."""

from __future__ import annotations

import struct

import pytest

from tests.support.relay_harness import Harness, control_reply, honest_answer
from usbgate.rules.policy import parse_rules
from usbgate.simulator import HID_KEYBOARD, MASS_STORAGE, FakeDevice
from usbgate.state import State
from usbgate.usbredir.descriptors import DescriptorType
from usbgate.usbredir.packets import (
    BulkPacket,
    ControlPacket,
    DeviceConnect,
    DeviceDisconnect,
    FilterReject,
    InterfaceInfo,
)
from usbgate.usbredir.wire import Status

# The rules of issue 12 finding 2: a keyboard interface is blocked wherever it appears.
RULES = "block with-interface 03:*:*\nallow id 0781:5567"


def get_descriptor(dtype: int, index: int = 0, length: int = 255, *, id: int = 7,
                   windex: int = 0) -> ControlPacket:  # fmt: skip
    return ControlPacket(0x80, 0x06, 0x80, 0, dtype << 8 | index, windex, length, id=id)


def attached(rules: str = RULES, device: FakeDevice | None = None) -> Harness:
    h = Harness(parse_rules(rules))
    h.hellos()
    h.attach(device or FakeDevice())
    assert h.relay.state is State.ATTACHED
    return h


def keyboard_config() -> bytes:
    return FakeDevice(interfaces=(HID_KEYBOARD,)).config_descriptor()


def test_allowed_device_is_forwarded_after_the_probe() -> None:
    h = attached()
    [(device, decision)] = h.judged
    assert device.interfaces == (MASS_STORAGE,) and device.serial == "4C530001"
    assert decision.allowed
    assert [type(p).__name__ for p in h.to_qemu[1:]] == ["InterfaceInfo", "EpInfo",
                                                         "DeviceConnect"]  # fmt: skip
    assert h.audit.actions() == ["usb.allowed"]


def test_denied_device_never_reaches_qemu() -> None:
    h = Harness(parse_rules(RULES))
    h.hellos()
    h.attach(FakeDevice(interfaces=(MASS_STORAGE, HID_KEYBOARD)))
    assert h.relay.state is State.BLOCKED
    assert not h.forwarded(DeviceConnect) and not h.forwarded(InterfaceInfo)
    assert any(isinstance(p, FilterReject) for p in h.to_owner)
    assert h.audit.actions() == ["usb.denied"]


def test_honest_replies_to_qemu_pass_unchanged() -> None:
    h = attached()
    device = FakeDevice()
    requests = [
        get_descriptor(DescriptorType.DEVICE, length=18, id=1),
        get_descriptor(DescriptorType.CONFIGURATION, length=9, id=2),
        get_descriptor(DescriptorType.CONFIGURATION, length=255, id=3),
        get_descriptor(DescriptorType.STRING, 3, windex=0x0409, id=4),
        get_descriptor(DescriptorType.CONFIGURATION, 1, id=5),
    ]  # STALL: no config 1
    for request in requests:
        h.qemu_send(request)
        h.owner_send(honest_answer(device, request))
    replies = h.forwarded(ControlPacket)
    assert [r.id for r in replies] == [1, 2, 3, 4, 5]
    assert replies[2].data == device.config_descriptor() and replies[4].status == Status.STALL
    assert h.relay.state is State.ATTACHED


def revoked(h: Harness, reason: str) -> None:
    assert h.relay.closed
    assert isinstance(h.to_qemu[-1], DeviceDisconnect)
    assert any(isinstance(p, FilterReject) for p in h.to_owner)
    assert h.audit.actions()[-1] == "usb.revoked"
    assert reason in h.audit.rows[-1][2]["reason"]


def test_a_reply_with_a_changed_windex_cannot_smuggle_a_keyboard() -> None:
    """Issue 12 finding 2: the check was keyed on the reply's own (value, index)."""
    h = attached()
    request = get_descriptor(DescriptorType.CONFIGURATION, length=255, id=11)
    h.qemu_send(request)
    h.owner_send(control_reply(request, Status.SUCCESS, keyboard_config(), index=0x0409))
    assert not any(r.id == 11 for r in h.forwarded(ControlPacket))
    revoked(h, "does not match its request")


def test_a_changed_configuration_in_an_echoing_reply_is_revoked() -> None:
    h = attached()
    request = get_descriptor(DescriptorType.CONFIGURATION, length=255, id=12)
    h.qemu_send(request)
    h.owner_send(control_reply(request, Status.SUCCESS, keyboard_config()))
    assert not h.forwarded(ControlPacket)
    revoked(h, "differs from the probed one")


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"value": 0x0200}, "does not match its request"),
     ({"request": 0x00}, "does not match its request"),
     ({"endpoint": 0x81}, "does not match its request")],
)  # fmt: skip
def test_every_echoed_field_must_match(change: dict[str, int], reason: str) -> None:
    h = attached()
    request = get_descriptor(DescriptorType.DEVICE, length=18, id=13)
    h.qemu_send(request)
    h.owner_send(control_reply(request, Status.SUCCESS, b"\x12\x01" + b"\0" * 16, **change))
    revoked(h, reason)


def test_a_reply_nobody_asked_for_is_revoked() -> None:
    h = attached()
    request = get_descriptor(DescriptorType.CONFIGURATION, length=255, id=14)
    h.owner_send(control_reply(request, Status.SUCCESS, keyboard_config()))
    revoked(h, "answers no request of QEMU")
    h = attached()
    h.qemu_send(request)
    h.owner_send(honest_answer(FakeDevice(), request))
    h.owner_send(honest_answer(FakeDevice(), request))  # the same id twice
    assert len(h.forwarded(ControlPacket)) == 1
    revoked(h, "answers no request of QEMU")


def test_more_bytes_than_asked_or_another_speed_hiding_a_keyboard() -> None:
    h = attached()
    request = get_descriptor(DescriptorType.CONFIGURATION, length=9, id=15)
    h.qemu_send(request)
    h.owner_send(control_reply(request, Status.SUCCESS, FakeDevice().config_descriptor()))
    revoked(h, "bytes for 9 asked")
    h = attached()
    request = get_descriptor(DescriptorType.OTHER_SPEED_CONFIGURATION, id=16)
    h.qemu_send(request)
    other = bytearray(keyboard_config())
    other[1] = DescriptorType.OTHER_SPEED_CONFIGURATION
    h.owner_send(control_reply(request, Status.SUCCESS, bytes(other)))
    revoked(h, "other-speed configuration")


def test_a_silent_device_is_denied_when_the_probe_times_out() -> None:
    h = Harness(parse_rules("allow id *:*"))
    h.hellos()
    h.owner_send(*(lambda d: (d.interface_info(), d.ep_info(), d.device_connect()))(FakeDevice()))
    assert h.relay.state is State.PROBING and h.relay.probe_deadline == 1.0
    h.now = 1.5
    h.relay.probe_timed_out()
    h.pump()
    assert h.relay.closed and h.audit.actions() == ["usb.denied"]
    assert "no answer in time" in h.audit.rows[0][2]["reason"]
    assert not h.forwarded(DeviceConnect)


def test_a_probe_answer_longer_than_asked_is_a_failed_probe() -> None:
    h = Harness(parse_rules("allow id *:*"))
    h.hellos()
    h.attach(FakeDevice(), answer=lambda r: control_reply(r, Status.SUCCESS, b"\x12\x01" * 20))
    assert h.relay.closed and "answered 40 > 18 bytes" in h.audit.rows[0][2]["reason"]
    assert not h.forwarded(DeviceConnect)


def test_string_descriptors_the_policy_judged_must_not_change() -> None:
    h = attached('allow id 0781:5567 serial "4C530001"')
    request = get_descriptor(DescriptorType.STRING, 3, windex=0x0409, id=17)
    h.qemu_send(request)
    other = "OTHERSER".encode("utf-16-le")
    h.owner_send(control_reply(request, Status.SUCCESS, struct.pack("<BB", 18, 3) + other))
    revoked(h, "differs from the probed one")


def test_bulk_packets_pass_byte_for_byte_and_a_bad_one_revokes() -> None:
    """Bulk packets are forwarded as received (not re-encoded), but only once checked."""
    h = attached()
    request = h.qemu.send(BulkPacket(0x81, 0, 512, id=21))
    h.relay.receive_qemu(request)
    assert h.relay.take_owner_bytes() == request
    reply = h.owner.send(BulkPacket(0x81, 0, 512, data=bytes(range(256)) * 2, id=21))
    out = h.owner.send(BulkPacket(0x02, 0, 3, id=22))  # an OUT transfer's status: no data
    h.relay.receive_owner(reply[:100])
    assert h.relay.take_qemu_bytes() == b""  # nothing of an incomplete packet
    h.relay.receive_owner(reply[100:] + out)
    assert h.relay.take_qemu_bytes() == reply + out
    # Data on the OUT endpoint from the owner: the wrong direction, never forwarded.
    bad = bytearray(h.owner.send(BulkPacket(0x82, 0, 4, data=b"evil", id=23)))
    bad[16] = 0x02  # the endpoint, after the header (16 bytes: both sides have 64-bit ids)
    h.owner_bytes(bytes(bad))
    assert h.relay.closed and isinstance(h.to_qemu[-1], DeviceDisconnect)
    assert not any(isinstance(p, BulkPacket) and p.id == 23 for p in h.to_qemu)
    assert h.audit.actions()[-1] == "usb.malformed"
