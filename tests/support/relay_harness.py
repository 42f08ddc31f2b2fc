"""A usbgate Relay between an in-memory owner and an in-memory QEMU: no sockets, no event loop.

The owner side is a usbredir usb-host (``Connection(Role.HOST)``) that answers the probe from
a simulated device's descriptors, or from a hostile script; the QEMU side is a usb-guest
(``Connection(Role.GUEST)``) that records everything the gateway forwards. Tests and fuzzers
use it to drive a session packet by packet, thousands of times a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from usbgate.relay import Relay
from usbgate.rules.policy import Decision, Device, Rule, decide
from usbgate.simulator import FakeDevice
from usbgate.sources import MemoryAuditSink
from usbgate.usbredir.codec import Connection
from usbgate.usbredir.packets import ControlPacket, Hello, Packet
from usbgate.usbredir.wire import ALL_CAPABILITIES, Role, Status

HELLO = Hello("test peer", (int(ALL_CAPABILITIES),))


def control_reply(asked: ControlPacket, status: int, data: bytes, **changes: int) -> ControlPacket:
    """The owner's answer to ``asked``, echoing its fields except ``changes``."""
    fields: dict[str, Any] = {
        "endpoint": asked.endpoint, "request": asked.request, "requesttype": asked.requesttype,
        "value": asked.value, "index": asked.index, "id": asked.id,
    }  # fmt: skip
    fields.update(changes)
    return ControlPacket(status=status, length=len(data), data=data, **fields)


def honest_answer(device: FakeDevice, request: ControlPacket) -> ControlPacket:
    """What a real device answers to a GET_DESCRIPTOR (STALL for what it does not have)."""
    data = device.descriptor(request.value)
    if data is None:
        return control_reply(request, Status.STALL, b"")
    return control_reply(request, Status.SUCCESS, data[: request.length])


@dataclass
class Harness:
    """One Relay with both of its peers in memory."""

    rules: list[Rule]
    audit: MemoryAuditSink = field(default_factory=MemoryAuditSink)
    now: float = 0.0
    judged: list[tuple[Device, Decision]] = field(default_factory=list)
    owner: Connection = field(default_factory=lambda: Connection(Role.HOST))
    qemu: Connection = field(default_factory=lambda: Connection(Role.GUEST))
    to_owner: list[Packet] = field(default_factory=list)
    to_qemu: list[Packet] = field(default_factory=list)
    relay: Relay = field(init=False)

    def __post_init__(self) -> None:
        self.relay = Relay(vm="vm", slot=0, peer="test", decide=self._decide, audit=self.audit,
                           probe_timeout=1.0, clock=lambda: self.now)  # fmt: skip

    def _decide(self, device: Device) -> Decision:
        decision = decide(self.rules, device)
        self.judged.append((device, decision))
        return decision

    # -- bytes and packets ---------------------------------------------------------------

    def owner_bytes(self, data: bytes) -> list[Packet]:
        """Feed raw owner bytes to the relay; returns the packets it sent to the owner."""
        self.relay.receive_owner(data)
        return self.pump()

    def owner_send(self, *packets: Packet) -> list[Packet]:
        return self.owner_bytes(b"".join(self.owner.send(p) for p in packets))

    def qemu_send(self, *packets: Packet) -> list[Packet]:
        self.relay.receive_qemu(b"".join(self.qemu.send(p) for p in packets))
        return self.pump()

    def pump(self) -> list[Packet]:
        """Move what the relay wrote to each peer; returns the new packets for the owner."""
        new_owner = self.owner.receive_packets(self.relay.take_owner_bytes())
        self.to_qemu += self.qemu.receive_packets(self.relay.take_qemu_bytes())
        self.to_owner += new_owner
        return new_owner

    def hellos(self) -> None:
        self.owner_send(HELLO)
        self.qemu_send(HELLO)

    def attach(self, device: FakeDevice, answer: Callable[[ControlPacket], Packet] | None = None
               ) -> None:  # fmt: skip
        """Announce ``device`` and answer the probe (honestly unless ``answer`` says)."""
        pending = self.owner_send(device.interface_info(), device.ep_info(),
                                  device.device_connect())  # fmt: skip
        reply = answer or (lambda request: honest_answer(device, request))
        while pending:
            request = pending.pop(0)
            if isinstance(request, ControlPacket):
                pending += self.owner_send(reply(request))

    def forwarded(self, kind: type[Any]) -> list[Any]:
        return [p for p in self.to_qemu if isinstance(p, kind)]
