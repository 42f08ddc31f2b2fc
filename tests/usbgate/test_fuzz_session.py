"""Fuzzing whole gateway sessions (the sans-IO relay) with a hostile owner and a busy QEMU.

Each case is a random script: the owner announces devices (honest or lying), answers the probe
honestly, wrongly or not at all, answers QEMU's control requests with changed fields or other
descriptors, sends packets of every type and garbage, unplugs; QEMU asks for descriptors and
sends what a usb-guest sends; the rules change (revocation and live allow). After every step:

- the relay raised nothing (a peer's bytes only ever become a closed session);
- every device_connect QEMU got is a device the policy allowed, as judged;
- every interface_info QEMU got lists only interfaces that were judged;
- every control reply QEMU got answers a request QEMU made, echoes it, and a device or
  configuration descriptor in it describes only the judged device.

Long run: ``VMSHIELD_FUZZ_CASES=1000000 .venv/bin/python -m pytest
tests/usbgate/test_fuzz_session.py``.
"""

from __future__ import annotations

import logging
import random
import struct
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.support.fuzzing import cases, mutate, random_packet, where
from tests.support.relay_harness import HELLO, Harness, control_reply, honest_answer
from usbgate.relay import PROBE_ID_BASE
from usbgate.rules.policy import Device, decide, parse_rules
from usbgate.simulator import HID_KEYBOARD, MASS_STORAGE, VENDOR, FakeDevice
from usbgate.state import State
from usbgate.usbredir.descriptors import DescriptorError, DescriptorType, interface_triples_in
from usbgate.usbredir.packets import (
    ControlPacket,
    DeviceConnect,
    DeviceDisconnect,
    FilterReject,
    InterfaceInfo,
    Packet,
)
from usbgate.usbredir.wire import Capability, Role, Status

RULESETS = [
    parse_rules("block with-interface 03:*:*\nallow id 0781:5567"),
    parse_rules("allow id 0781:*"),
    parse_rules('allow id 0781:5567 serial "4C530001" with-interface 08:06:50'),
    parse_rules("reject id 1234:*\nallow id *:*"),
    [],
]
DEVICES = [
    FakeDevice(),
    FakeDevice(interfaces=(MASS_STORAGE, HID_KEYBOARD)),
    FakeDevice(0x1234, 0x0001, interfaces=(VENDOR,)),
    FakeDevice(0x0781, 0x5567, interfaces=(HID_KEYBOARD,), serial=None),
    FakeDevice(descriptor_interfaces=(HID_KEYBOARD,)),
    FakeDevice(descriptor_vendor_id=0x0781 ^ 1),
]
ASKED = (DescriptorType.DEVICE, DescriptorType.CONFIGURATION, DescriptorType.STRING,
         DescriptorType.OTHER_SPEED_CONFIGURATION)  # fmt: skip
KEYBOARD_CONFIG = FakeDevice(interfaces=(HID_KEYBOARD,)).config_descriptor()


class Script:
    """One case: a harness, the hostile owner's device, and the checks of what QEMU got."""

    def __init__(self, rng: random.Random, n: int) -> None:
        self.rng, self.n = rng, n
        self.h = Harness(list(rng.choice(RULESETS)))
        self.device = rng.choice(DEVICES)
        self.pending_probe: list[ControlPacket] = []
        self.qemu_requests: dict[int, ControlPacket] = {}
        self.checked = 0
        self.next_qemu_id = 1

    # -- the checks ----------------------------------------------------------------------

    def allowed_device(self) -> Device:
        allowed = [device for device, decision in self.h.judged if decision.allowed]
        assert allowed, f"{where(self.n)}: QEMU got a device the policy never allowed"
        return allowed[-1]

    def check(self) -> None:
        for packet in self.h.to_qemu[self.checked :]:
            self.check_one(packet)
        self.checked = len(self.h.to_qemu)

    def check_one(self, packet: Packet) -> None:
        at = where(self.n)
        if isinstance(packet, DeviceConnect):
            device, decision = self.h.judged[-1]
            assert decision.allowed, f"{at}: device_connect after a denial"
            assert (packet.vendor_id, packet.product_id, packet.device_class) == (
                device.vendor_id, device.product_id, device.device_class), at  # fmt: skip
        elif isinstance(packet, InterfaceInfo):
            judged = set(self.allowed_device().interfaces)
            got = {(i.interface_class, i.interface_subclass, i.interface_protocol)
                   for i in packet.interfaces}  # fmt: skip
            assert got <= judged, f"{at}: interface_info {got} beyond the judged {judged}"
        elif isinstance(packet, ControlPacket):
            request = self.qemu_requests.pop(packet.id, None)
            assert request is not None, f"{at}: a control reply QEMU never asked for"
            fields = ("endpoint", "request", "requesttype", "value", "index")
            assert all(getattr(packet, f) == getattr(request, f) for f in fields), at
            if packet.status == Status.SUCCESS and (request.request, request.requesttype) == (
                0x06, 0x80):  # fmt: skip
                self.check_descriptor(request, packet.data)

    def check_descriptor(self, request: ControlPacket, data: bytes) -> None:
        at, device = where(self.n), self.allowed_device()
        dtype = request.value >> 8
        if dtype in (DescriptorType.CONFIGURATION, DescriptorType.OTHER_SPEED_CONFIGURATION):
            try:
                triples = set(interface_triples_in(data))
            except DescriptorError as exc:
                raise AssertionError(f"{at}: QEMU got a malformed configuration") from exc
            assert triples <= set(device.interfaces), f"{at}: QEMU got unjudged {triples}"
        elif dtype == DescriptorType.DEVICE and len(data) >= 12:
            assert struct.unpack_from("<HH", data, 8) == (device.vendor_id, device.product_id), at

    # -- the owner's moves ---------------------------------------------------------------

    def owner_send(self, *packets: Packet) -> None:
        for reply in self.h.owner_send(*packets):
            if isinstance(reply, ControlPacket) and reply.id >= PROBE_ID_BASE:
                self.pending_probe.append(reply)

    def announce(self) -> None:
        d, rng = self.device, self.rng
        connect = d.device_connect()
        if rng.random() < 0.2:
            connect = DeviceConnect(connect.speed, rng.choice((0, 3, 8)), 0, 0,
                                    rng.choice((0x0781, 0x1234)), rng.choice((0x5567, 1)),
                                    connect.device_version_bcd)  # fmt: skip
        info = d.interface_info()
        if rng.random() < 0.2:
            other = rng.choice((MASS_STORAGE, HID_KEYBOARD, VENDOR))
            info = FakeDevice(interfaces=(other,)).interface_info()
        self.owner_send(info, d.ep_info(), connect)

    def answer_probe(self) -> None:
        if not self.pending_probe:
            return
        request, rng = self.pending_probe.pop(0), self.rng
        honest = honest_answer(self.device, request)
        choice = rng.randrange(40)
        if choice > 8:
            reply = honest
        elif choice == 6:
            reply = control_reply(
                request, Status.SUCCESS, mutate(rng, honest.data)[: request.length]
            )
        elif choice == 7:
            reply = control_reply(request, Status.STALL, b"")
        elif choice == 8:
            reply = control_reply(request, Status.SUCCESS, KEYBOARD_CONFIG[: request.length])
        else:
            reply = control_reply(request, Status.SUCCESS, honest.data, index=request.index ^ 1)
        self.owner_send(reply)

    def answer_qemu(self) -> None:
        if not self.qemu_requests:
            return
        request, rng = rng_pick(self.rng, self.qemu_requests), self.rng
        honest = honest_answer(self.device, request)
        choice = rng.randrange(8)
        if choice < 4:
            reply = honest
        elif choice == 4:
            reply = control_reply(request, Status.SUCCESS, KEYBOARD_CONFIG[: request.length],
                                  index=request.index ^ 0x0409)  # fmt: skip
        elif choice == 5:
            reply = control_reply(request, Status.SUCCESS, KEYBOARD_CONFIG[: request.length])
        elif choice == 6:
            reply = control_reply(request, Status.SUCCESS, honest.data, id=request.id + 1)
        else:
            reply = control_reply(
                request, Status.SUCCESS, mutate(rng, honest.data)[: request.length]
            )
        self.owner_send(reply)

    def qemu_asks(self) -> None:
        dtype = self.rng.choice(ASKED)
        index = self.rng.choice((0, 0, 1, 3))
        windex = 0x0409 if dtype == DescriptorType.STRING else 0
        request = ControlPacket(0x80, 0x06, 0x80, 0, dtype << 8 | index, windex,
                                self.rng.choice((9, 18, 255)), id=self.next_qemu_id)  # fmt: skip
        self.next_qemu_id += 1
        if self.h.relay.state is State.ATTACHED:
            self.qemu_requests[request.id] = request
        self.h.qemu_send(request)

    def step(self) -> None:
        rng, relay = self.rng, self.h.relay
        if self.pending_probe and rng.random() < 0.9:
            self.answer_probe()  # a device mostly answers while it is probed
            return
        move = rng.randrange(13)
        if move == 0:
            self.announce()
        elif move in (1, 2, 3):
            self.answer_probe()
        elif move in (4, 5):
            self.qemu_asks()
        elif move == 6:
            self.answer_qemu()
        elif move == 7:
            caps = self.h.owner.caps or Capability(0)
            self.owner_send(random_packet(rng, Role.HOST, caps))
        elif move == 8:
            wire = self.h.owner.send(
                random_packet(rng, Role.HOST, self.h.owner.caps or Capability(0))
            )
            self.h.owner_bytes(mutate(rng, wire))
        elif move == 9:
            self.owner_send(DeviceDisconnect())
        elif move == 10:
            caps = self.h.qemu.caps or Capability(0)
            packet = random_packet(rng, Role.GUEST, caps) if rng.random() < 0.8 else FilterReject()
            if not isinstance(packet, ControlPacket):
                self.h.qemu_send(packet)
        elif move == 11:  # the rules change: revoke or admit, as the gateway does
            self.h.rules = list(rng.choice(RULESETS))
            device = relay.device
            if device is not None and relay.state in (State.ATTACHED, State.BLOCKED):
                decision = decide(self.h.rules, device)
                self.h.judged.append((device, decision))
                if relay.state is State.BLOCKED:
                    relay.admit(decision)
                elif not decision.allowed:
                    relay.revoke(decision)
                self.h.pump()
        else:
            self.h.now += 2.0
            relay.probe_timed_out()
            self.h.pump()


def rng_pick(rng: random.Random, requests: dict[int, ControlPacket]) -> ControlPacket:
    return requests[rng.choice(list(requests))]


@pytest.fixture
def quiet_relay() -> Iterator[None]:
    """Thousands of 'malformed usbredir' warnings would cost more than the sessions."""
    logger = logging.getLogger("usbgate.relay")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.mark.usefixtures("quiet_relay")
def test_fuzz_sessions_with_a_hostile_owner() -> None:
    ends: Counter[str] = Counter()
    for n, rng in cases(9_000, salt=5):
        script = Script(rng, n)
        try:
            script.h.owner_send(HELLO)
            script.h.qemu_send(HELLO)
            script.announce()
            for _ in range(rng.randint(2, 14)):
                if script.h.relay.closed:
                    break
                script.step()
                script.check()
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(f"{where(n)}: {type(exc).__name__}: {exc}") from exc
        ends[script.h.relay.state.value] += 1
        for action in script.h.audit.actions():
            ends[action] += 1
    print(f"\nsession fuzz: {n + 1} cases; end states and audit rows: {dict(ends)}")
    assert ends["usb.allowed"] and ends["usb.revoked"] and ends["usb.denied"]
