"""One gateway session: an owner's usbredir connection relayed to one QEMU usb-redir chardev.

usbgate plays the usb-guest towards the owner and the usb-host towards QEMU, with one sans-IO
``Connection`` per side; every packet is decoded and re-encoded, never copied blindly.

    owner --hello--> usbgate --hello--> QEMU     (hellos relay unchanged, both ways)
    owner --interface_info, ep_info, device_connect--> usbgate     (held)
    usbgate <--GET_DESCRIPTOR--> owner                             (probe)
    policy allows:  usbgate --held packets--> QEMU, then relay both ways
    policy denies:  usbgate --filter_reject--> owner  (reject: and close); QEMU sees nothing
    revoked later:  device_disconnect --> QEMU, filter_reject --> owner, close both

States: HELLO -> WAITING -> PROBING -> ATTACHED | BLOCKED; a device_disconnect from the owner
goes back to WAITING (a new device may be announced on the same connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from usbgate.addresses import READ_SIZE
from usbgate.errors import ProtocolError
from usbgate.policy import Action, Decision, Device
from usbgate.probe import (
    Contradiction,
    ProbeFailed,
    ProbeResult,
    interfaces_within,
    probe,
    reconcile,
)
from usbgate.sources import AuditSink
from usbgate.usbredir.codec import CLOSED, Connection, Sentinel
from usbgate.usbredir.descriptors import (
    REQUEST_GET_DESCRIPTOR,
    REQUESTTYPE_IN_STANDARD_DEVICE,
    DescriptorType,
)
from usbgate.usbredir.packets import (
    ControlPacket,
    DeviceConnect,
    DeviceDisconnect,
    DeviceDisconnectAck,
    EpInfo,
    FilterFilter,
    FilterReject,
    Hello,
    InterfaceInfo,
    Packet,
)
from usbgate.usbredir.wire import Capability, Role, Status

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0
# Probe requests use ids far from QEMU's so a late answer can never be mistaken for QEMU's.
PROBE_ID_BASE = 0xFFFF_0000


class State(enum.Enum):
    """Where a session is in its life."""

    HELLO = "hello"
    """Waiting for both hellos."""
    WAITING = "waiting"
    """No device announced yet (or the last one was unplugged)."""
    PROBING = "probing"
    """A device is announced and held; its descriptors are being read."""
    ATTACHED = "attached"
    """The device was allowed and forwarded to QEMU; packets relay both ways."""
    BLOCKED = "blocked"
    """The device was denied; waiting for the owner to unplug it or hang up."""
    CLOSED = "closed"
    """Both connections are closed."""


Decider = Callable[[Device], Decision]


class Session:
    """Relays one owner connection to one QEMU chardev under the VM's policy."""

    def __init__(
        self,
        *,
        vm: str,
        slot: int,
        peer: str,
        owner: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        qemu: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        decide: Decider,
        audit: AuditSink,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.vm, self.slot, self.peer = vm, slot, peer
        self.owner_reader, self.owner_writer = owner
        self.qemu_reader, self.qemu_writer = qemu
        self.owner_conn = Connection(Role.GUEST)
        self.qemu_conn = Connection(Role.HOST)
        self.decide, self.audit = decide, audit
        self.probe_timeout = probe_timeout
        self.state = State.HELLO
        self.interface_info: InterfaceInfo | None = None
        self.ep_info: EpInfo | None = None
        self.connect: DeviceConnect | None = None
        self.device: Device | None = None
        self.probe_result: ProbeResult | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_waiters: dict[int, asyncio.Future[ControlPacket]] = {}
        self._probe_count = 0
        self._qemu_refused = False
        self.closed = asyncio.Event()

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay until either side closes, misbehaves, or the session is revoked."""
        pumps = [
            asyncio.create_task(self._pump("owner", self.owner_reader, self.owner_conn)),
            asyncio.create_task(self._pump("qemu", self.qemu_reader, self.qemu_conn)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self.state is State.ATTACHED:
                self._audit("usb.detached", reason="connection closed")
            self.close()
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (self.owner_writer, self.qemu_writer):
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _pump(self, side: str, reader: asyncio.StreamReader, conn: Connection) -> None:
        try:
            while self.state is not State.CLOSED:
                data = await reader.read(READ_SIZE)
                conn.receive_data(data)
                if self._drain(side) is CLOSED:
                    return
                await self._flush()
        except ProtocolError as exc:
            self._malformed(side, str(exc))
        except (ConnectionError, OSError) as exc:
            log.info("vm %s slot %d: %s connection lost: %s", self.vm, self.slot, side, exc)

    def _drain(self, side: str) -> Sentinel:
        """Handle every complete packet buffered on ``side``; CLOSED once that side has hung up."""
        conn = self.owner_conn if side == "owner" else self.qemu_conn
        handle = self._from_owner if side == "owner" else self._from_qemu
        while self.state is not State.CLOSED:
            event = conn.next_event()
            if isinstance(event, Sentinel):
                return event
            handle(event)
        return CLOSED

    async def _flush(self) -> None:
        for writer in (self.owner_writer, self.qemu_writer):
            if not writer.is_closing():
                await writer.drain()

    # -- owner -> QEMU -----------------------------------------------------------------------

    def _from_owner(self, packet: Packet) -> None:
        if isinstance(packet, Hello):
            self._send_qemu(packet)
            self._hellos_relayed("qemu")
            return
        if isinstance(packet, ControlPacket) and packet.id in self._probe_waiters:
            future = self._probe_waiters.pop(packet.id)
            if not future.done():
                future.set_result(packet)
            return
        match self.state:
            case State.WAITING:
                self._hold(packet)
            case State.PROBING:
                if isinstance(packet, DeviceDisconnect):
                    self._unplugged_before_qemu()
                else:
                    raise ProtocolError(f"{packet.TYPE.name} while the device is being checked")
            case State.BLOCKED:
                if isinstance(packet, DeviceDisconnect):
                    self._unplugged_before_qemu()
                elif not isinstance(packet, ControlPacket):  # late probe answers are ignored
                    raise ProtocolError(f"{packet.TYPE.name} from a denied device")
            case State.ATTACHED:
                self._relay_attached(packet)
            case _:
                raise ProtocolError(f"{packet.TYPE.name} before the hellos")

    def _hold(self, packet: Packet) -> None:
        if isinstance(packet, InterfaceInfo):
            self.interface_info = packet
        elif isinstance(packet, EpInfo):
            self.ep_info = packet
        elif isinstance(packet, DeviceConnect):
            self.connect = packet
            self.state = State.PROBING
            self._probe_task = asyncio.create_task(self._probe_and_decide())
        elif isinstance(packet, DeviceDisconnect):
            self._unplugged_before_qemu()
        else:
            raise ProtocolError(f"{packet.TYPE.name} before any device was announced")

    def _relay_attached(self, packet: Packet) -> None:
        result = self.probe_result
        if isinstance(packet, InterfaceInfo) and result and not interfaces_within(packet, result):
            self.revoke(Decision(Action.REJECT, "interface_info lists an undescribed interface"))
            return
        if (
            isinstance(packet, ControlPacket)
            and result
            and not _descriptor_consistent(packet, result)
        ):
            self.revoke(Decision(Action.REJECT, "descriptor differs from the probed one"))
            return
        if isinstance(packet, DeviceConnect):
            raise ProtocolError("device_connect while a device is attached")
        if isinstance(packet, DeviceDisconnect):
            self._audit("usb.detached", reason="unplugged by the owner")
            self._reset_device()
        self._send_qemu(packet)

    def _unplugged_before_qemu(self) -> None:
        """The owner unplugged a device QEMU never saw: acknowledge it ourselves."""
        if self._probe_task is not None:
            self._probe_task.cancel()
        self._reset_device()
        caps = self.owner_conn.caps
        if caps is not None and caps & Capability.DEVICE_DISCONNECT_ACK:
            self._send_owner(DeviceDisconnectAck())

    def _reset_device(self) -> None:
        self.state = State.WAITING
        self.interface_info = self.ep_info = self.connect = None
        self.device = self.probe_result = None

    # -- QEMU -> owner -----------------------------------------------------------------------

    def _from_qemu(self, packet: Packet) -> None:
        if isinstance(packet, Hello):
            self._send_owner(packet)
            self._hellos_relayed("owner")
            return
        if isinstance(packet, FilterFilter | DeviceDisconnectAck):
            self._send_owner(packet)
        elif isinstance(packet, FilterReject):
            # QEMU's own filter= refused what the policy allowed: pass its verdict on.
            self._audit("usb.denied", action="block", reason="refused by QEMU's filter")
            self.state, self._qemu_refused = State.BLOCKED, True
            self._send_owner(packet)
        elif self.state is State.ATTACHED:
            self._send_owner(packet)
        # Otherwise: a late packet for a device that is gone from QEMU; drop it.

    def _hellos_relayed(self, other: str) -> None:
        """After relaying a hello, packets ``other`` sent behind its own hello can be read."""
        if self.state is not State.HELLO or self.owner_conn.caps is None:
            return
        if self.qemu_conn.caps is None:
            return
        self.state = State.WAITING
        try:
            self._drain(other)
        except ProtocolError as exc:
            self._malformed(other, str(exc))

    # -- probing and deciding ----------------------------------------------------------------

    async def _read_descriptor(self, value: int, index: int, length: int) -> bytes:
        packet_id = PROBE_ID_BASE + self._probe_count % 0xFFFF
        self._probe_count += 1
        future: asyncio.Future[ControlPacket] = asyncio.get_running_loop().create_future()
        self._probe_waiters[packet_id] = future
        self._send_owner(ControlPacket(0x80, REQUEST_GET_DESCRIPTOR,
                                       REQUESTTYPE_IN_STANDARD_DEVICE, 0, value, index, length,
                                       id=packet_id))  # fmt: skip
        try:
            reply = await future
        finally:  # also when cancelled: a later probe must not inherit this waiter
            self._probe_waiters.pop(packet_id, None)
        if reply.status != Status.SUCCESS:
            raise ProbeFailed(f"GET_DESCRIPTOR {value:#06x} answered status {reply.status}")
        return reply.data

    async def _probe_and_decide(self) -> None:
        connect = self.connect
        assert connect is not None
        try:
            async with asyncio.timeout(self.probe_timeout):
                result = await probe(self._read_descriptor)
            caps = self.owner_conn.caps or Capability(0)
            bcd = bool(caps & Capability.CONNECT_DEVICE_VERSION)
            device = reconcile(connect, self.interface_info, result, bcd_announced=bcd)
        except (ProbeFailed, Contradiction, TimeoutError) as exc:
            what = "descriptors contradict the announcement" if isinstance(
                exc, Contradiction) else "probe failed"  # fmt: skip
            reason = f"{what}: {str(exc) or 'no answer in time'}"
            self._deny(Decision(Action.REJECT, reason), _announced(connect))
            return
        if self.state is not State.PROBING:
            return
        self.device, self.probe_result = device, result
        decision = self.decide(device)
        if not decision.allowed:
            self._deny(decision, device)
            return
        self.state = State.ATTACHED
        for packet in (self.interface_info, self.ep_info, connect):
            if packet is not None:
                self._send_qemu(packet)
        self._audit("usb.allowed", reason=decision.reason)

    def _deny(self, decision: Decision, device: Device) -> None:
        if self.state is not State.PROBING:
            return
        self.device = device
        self.state = State.BLOCKED
        self._audit("usb.denied", action=str(decision.action), reason=decision.reason)
        self._reject_owner()
        if decision.action is Action.REJECT:
            self.close()

    def admit(self, decision: Decision) -> bool:
        """Forward a device the rules blocked earlier and now allow, without a replug (live
        allow): the held announcement goes to QEMU. False if there is nothing to admit."""
        if (
            self.state is not State.BLOCKED
            or self.probe_result is None  # denied by its probe, not by the rules
            or self.connect is None
            or self._qemu_refused
            or not decision.allowed
        ):
            return False
        self.state = State.ATTACHED
        for packet in (self.interface_info, self.ep_info, self.connect):
            if packet is not None:
                self._send_qemu(packet)
        self._audit("usb.allowed", reason=f"rules changed: {decision.reason}")
        return True

    # -- revocation and closing --------------------------------------------------------------

    def revoke(self, decision: Decision, *, since: float | None = None) -> None:
        """Detach the forwarded device now: device_disconnect to QEMU, filter_reject, close."""
        if self.state is not State.ATTACHED:
            return
        self._send_qemu(DeviceDisconnect())
        self._reject_owner()
        self.close()
        detail: dict[str, Any] = {"reason": decision.reason}
        if since is not None:
            detail["latency_ms"] = round((time.monotonic() - since) * 1000, 2)
        self._audit("usb.revoked", **detail)

    def _reject_owner(self) -> None:
        caps = self.owner_conn.caps
        if caps is not None and caps & Capability.FILTER:
            self._send_owner(FilterReject())

    def _malformed(self, side: str, error: str) -> None:
        log.warning(
            "vm %s slot %d: malformed usbredir from %s: %s", self.vm, self.slot, side, error
        )
        self._audit("usb.malformed", side=side, error=error)
        if self.state is State.ATTACHED and side == "owner":
            self._send_qemu(DeviceDisconnect())
        self.close()

    def close(self) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        if self._probe_task is not None:
            self._probe_task.cancel()
        for writer in (self.qemu_writer, self.owner_writer):
            with contextlib.suppress(Exception):
                writer.close()
        self.closed.set()

    # -- helpers -----------------------------------------------------------------------------

    def _send_owner(self, packet: Packet) -> None:
        if not self.owner_writer.is_closing():
            self.owner_writer.write(self.owner_conn.send(packet))

    def _send_qemu(self, packet: Packet) -> None:
        if not self.qemu_writer.is_closing():
            self.qemu_writer.write(self.qemu_conn.send(packet))

    def _audit(self, event: str, **detail: Any) -> None:
        row: dict[str, Any] = {"slot": self.slot, "peer": self.peer, **detail}
        if self.device is not None:
            row["device"] = self.device.describe()
        elif self.connect is not None:
            row["device"] = _announced(self.connect).describe()
        log.info("vm %s: %s %s", self.vm, event, row)
        self.audit.record(event, self.vm, row)


def _announced(connect: DeviceConnect) -> Device:
    return Device(connect.vendor_id, connect.product_id, connect.device_class,
                  bcd_device=connect.device_version_bcd)  # fmt: skip


def _descriptor_consistent(reply: ControlPacket, result: ProbeResult) -> bool:
    """A device or configuration descriptor sent to QEMU must match the one probed."""
    if (reply.request, reply.requesttype, reply.status) != (
        REQUEST_GET_DESCRIPTOR,
        REQUESTTYPE_IN_STANDARD_DEVICE,
        Status.SUCCESS,
    ) or reply.value >> 8 not in (DescriptorType.DEVICE, DescriptorType.CONFIGURATION):
        return True
    probed = result.raw.get((reply.value, reply.index))
    return probed is None or probed.startswith(reply.data)
