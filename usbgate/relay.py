"""One gateway session without I/O: bytes from the owner and from QEMU in, bytes for each out.

usbgate plays the usb-guest towards the owner and the usb-host towards QEMU, with one sans-IO
``Connection`` per side; every packet is decoded and re-encoded, never copied blindly, except
bulk packets: both sides' capabilities are the same (the hellos relay unchanged), so a bulk
packet is checked as decoding would check it and, once its device is attached, its bytes are
forwarded as they came (``Frame``); bulk data is what a stick's copy is made of.

    owner --hello--> usbgate --hello--> QEMU     (hellos relay unchanged, both ways)
    owner --interface_info, ep_info, device_connect--> usbgate     (held)
    usbgate <--GET_DESCRIPTOR--> owner                             (probe)
    policy allows:  usbgate --held packets--> QEMU, then relay both ways
    policy denies:  usbgate --filter_reject--> owner  (reject: and close); QEMU sees nothing
    revoked later:  device_disconnect --> QEMU, filter_reject --> owner, close both

While a device is attached, every control transfer QEMU asks for is remembered by its id, and
the owner's reply must answer exactly that request (QEMU matches replies by id alone). A
descriptor the device returns to QEMU must be the one the probe read and the policy judged.
Anything else revokes the device: the owner is the untrusted side.

The state lives in usbgate.state's table; this module maps packets to its events. The caller
(usbgate.session) feeds bytes with ``receive_owner`` / ``receive_qemu``, writes what
``take_owner_bytes`` / ``take_qemu_bytes`` return, and calls ``timed_out`` once ``deadline``
has passed. None of these raise for anything a peer sends.

A session without a device (before the hellos, or after an unplug) holds one of the VM's few
usb-redir slots: after ``idle_timeout`` without a device announced it is closed (audited as
``usb.denied``), so an owner that says hello and nothing more cannot keep a slot forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from usbgate.errors import ProtocolError
from usbgate.probe import (
    Contradiction,
    ProbeFailed,
    ProbeResult,
    ProbeSteps,
    interfaces_within,
    probe_steps,
    reconcile,
)
from usbgate.replies import reply_problem
from usbgate.rules.policy import Action, Decision, Device
from usbgate.sources import AuditSink
from usbgate.state import Event, SessionState, State
from usbgate.usbredir.codec import Connection, Frame, Sentinel
from usbgate.usbredir.descriptors import (
    REQUEST_GET_DESCRIPTOR,
    REQUESTTYPE_IN_STANDARD_DEVICE,
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
# A session may sit without a device this long (usbredirect announces its device at once).
IDLE_TIMEOUT = 30.0
_DEVICELESS = (State.HELLO, State.WAITING)
# Probe requests use ids far from QEMU's so a late answer can never be mistaken for QEMU's.
PROBE_ID_BASE = 0xFFFF_0000
# QEMU's control transfers waiting for the owner's reply (QEMU keeps far fewer in flight).
MAX_PENDING_CONTROL = 4096

Decider = Callable[[Device], Decision]
Clock = Callable[[], float]


class Relay:
    """The policy-enforcing relay of one owner connection to one QEMU chardev, sans-IO."""

    def __init__(
        self,
        *,
        vm: str,
        slot: int,
        peer: str,
        decide: Decider,
        audit: AuditSink,
        probe_timeout: float = PROBE_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Clock = time.monotonic,
    ) -> None:
        self.vm, self.slot, self.peer = vm, slot, peer
        self.decide, self.audit = decide, audit
        self.probe_timeout, self.idle_timeout, self.clock = probe_timeout, idle_timeout, clock
        self.owner_conn = Connection(Role.GUEST)
        self.qemu_conn = Connection(Role.HOST)
        self.machine = SessionState()
        self.interface_info: InterfaceInfo | None = None
        self.ep_info: EpInfo | None = None
        self.connect: DeviceConnect | None = None
        self.device: Device | None = None
        self.probe_result: ProbeResult | None = None
        self.probe_deadline: float | None = None
        """Monotonic time by which the probe must be done; None when no probe is running."""
        self.idle_deadline: float | None = self.clock() + idle_timeout
        """Monotonic time by which a device must be announced; None while there is one."""
        self._probe: ProbeSteps | None = None
        self._probe_id: int | None = None
        self._probe_count = 0
        self._qemu_requests: dict[int, ControlPacket] = {}
        self._qemu_refused = False
        self._frames = False
        """Bulk packets are forwarded as their checked bytes (``Frame``s), not re-encoded."""
        self._to_owner: list[bytes] = []
        self._to_qemu: list[bytes] = []

    @property
    def state(self) -> State:
        return self.machine.state

    # -- the caller's side -------------------------------------------------------------------

    def receive_owner(self, data: bytes) -> None:
        """Bytes read from the owner (``b""``: it hung up)."""
        self._receive("owner", data)

    def receive_qemu(self, data: bytes) -> None:
        """Bytes read from QEMU (``b""``: it hung up)."""
        self._receive("qemu", data)

    def connection_lost(self, side: str, error: str) -> None:
        """The socket of ``side`` failed (not a clean end of stream)."""
        log.info("vm %s slot %d: %s connection lost: %s", self.vm, self.slot, side, error)
        self.close(hung_up=True)

    def take_owner_bytes(self) -> bytes:
        out, self._to_owner = self._to_owner, []
        return out[0] if len(out) == 1 else b"".join(out)

    def take_qemu_bytes(self) -> bytes:
        out, self._to_qemu = self._to_qemu, []
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def closed(self) -> bool:
        return self.machine.closed

    @property
    def deadline(self) -> float | None:
        """The earliest time at which ``timed_out`` has something to do (None: nothing)."""
        times = [t for t in (self.probe_deadline, self.idle_deadline) if t is not None]
        return min(times) if times and not self.closed else None

    def timed_out(self) -> None:
        """Called once ``deadline`` has passed: a probe without an answer denies its device,
        a session still without a device is closed (its slot is free again)."""
        now = self.clock() + 0.005  # asyncio may run a timer up to its clock resolution early
        if self.probe_deadline is not None and now >= self.probe_deadline:
            self.probe_timed_out()
        if self.idle_deadline is not None and now >= self.idle_deadline:
            if self.state in _DEVICELESS:
                reason = f"no device announced within {self.idle_timeout:g} s"
                self._audit("usb.denied", action="reject", reason=reason)
                self.close()
            self.idle_deadline = None

    def _track_idle(self) -> None:
        """Start the idle clock when the session is left without a device, stop it when one
        is announced."""
        if self.state not in _DEVICELESS or self.closed:
            self.idle_deadline = None
        elif self.idle_deadline is None:
            self.idle_deadline = self.clock() + self.idle_timeout

    def _receive(self, side: str, data: bytes) -> None:
        if self.closed:
            return
        conn = self.owner_conn if side == "owner" else self.qemu_conn
        try:
            conn.receive_data(data)
            self._drain(side)
        except ProtocolError as exc:
            self._malformed(side, str(exc))
        self._track_idle()

    def _drain(self, side: str) -> None:
        """Handle every complete packet buffered on ``side``."""
        conn = self.owner_conn if side == "owner" else self.qemu_conn
        handle = self._from_owner if side == "owner" else self._from_qemu
        while not self.closed:
            event = conn.next_frame(frames=self._frames)
            if event is Sentinel.NEED_DATA:
                return
            if event is Sentinel.CLOSED:
                self.close(hung_up=True)
                return
            assert not isinstance(event, Sentinel)
            if type(event) is Frame and self.machine.state is State.ATTACHED:
                # The hot path of a copy: checked bulk bytes, forwarded as they came.
                (self._to_qemu if side == "owner" else self._to_owner).append(event.raw)
                continue
            handle(event)

    # -- owner -> QEMU -----------------------------------------------------------------------

    def _from_owner(self, packet: Packet | Frame) -> None:
        if isinstance(packet, Hello):
            self._send_qemu(packet)
            self._hellos_relayed("qemu")
            return
        match self.state:
            case State.WAITING:
                self._hold(packet)
            case State.PROBING:
                if isinstance(packet, ControlPacket) and packet.id == self._probe_id:
                    self._probe_answer(packet)
                elif isinstance(packet, DeviceDisconnect):
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

    def _hold(self, packet: Packet | Frame) -> None:
        if isinstance(packet, InterfaceInfo):
            self.interface_info = packet
        elif isinstance(packet, EpInfo):
            self.ep_info = packet
        elif isinstance(packet, DeviceConnect):
            self.connect = packet
            self.machine.handle(Event.ANNOUNCED)
            self._start_probe()
        elif isinstance(packet, DeviceDisconnect):
            self._unplugged_before_qemu()
        else:
            raise ProtocolError(f"{packet.TYPE.name} before any device was announced")

    def _relay_attached(self, packet: Packet | Frame) -> None:
        result = self.probe_result
        assert result is not None
        if isinstance(packet, InterfaceInfo) and not interfaces_within(packet, result):
            self.revoke(Decision(Action.REJECT, "interface_info lists an undescribed interface"))
            return
        if isinstance(packet, ControlPacket):
            problem = self._check_reply(packet, result)
            if problem is not None:
                self.revoke(Decision(Action.REJECT, problem))
                return
        if isinstance(packet, DeviceConnect):
            raise ProtocolError("device_connect while a device is attached")
        if isinstance(packet, DeviceDisconnect):
            self._audit("usb.detached", reason="unplugged by the owner")
            self.machine.handle(Event.UNPLUGGED)
            self._forget_device()
        self._send_qemu(packet)

    def _check_reply(self, reply: ControlPacket, result: ProbeResult) -> str | None:
        """Why the owner's control reply must not reach QEMU (None: it may)."""
        request = self._qemu_requests.pop(reply.id, None)
        if request is None:
            return f"control reply with id {reply.id} answers no request of QEMU"
        return reply_problem(request, reply, result)

    def _unplugged_before_qemu(self) -> None:
        """The owner unplugged a device QEMU never saw: acknowledge it ourselves."""
        self.machine.handle(Event.UNPLUGGED)
        self._forget_device()
        caps = self.owner_conn.caps
        if caps is not None and caps & Capability.DEVICE_DISCONNECT_ACK:
            self._send_owner(DeviceDisconnectAck())

    def _forget_device(self) -> None:
        self.interface_info = self.ep_info = self.connect = None
        self.device = self.probe_result = None
        self._qemu_refused = False
        self._stop_probe()
        self._qemu_requests.clear()

    # -- QEMU -> owner -----------------------------------------------------------------------

    def _from_qemu(self, packet: Packet | Frame) -> None:
        if isinstance(packet, Hello):
            self._send_owner(packet)
            self._hellos_relayed("owner")
            return
        if isinstance(packet, FilterFilter | DeviceDisconnectAck):
            self._send_owner(packet)
        elif isinstance(packet, FilterReject):
            if self.machine.can(Event.QEMU_REFUSED):
                # QEMU's own filter= refused what the policy allowed: pass its verdict on.
                self._audit("usb.denied", action="block", reason="refused by QEMU's filter")
                self.machine.handle(Event.QEMU_REFUSED)
                self._qemu_refused = True
                self._qemu_requests.clear()
                self._send_owner(packet)
        elif self.state is State.ATTACHED:
            if isinstance(packet, ControlPacket):
                if len(self._qemu_requests) >= MAX_PENDING_CONTROL:  # forget the oldest
                    del self._qemu_requests[next(iter(self._qemu_requests))]
                self._qemu_requests[packet.id] = packet
            self._send_owner(packet)
        # Otherwise: a late packet for a device that is gone from QEMU; drop it.

    def _hellos_relayed(self, other: str) -> None:
        """After relaying a hello, packets ``other`` sent behind its own hello can be read."""
        if self.state is not State.HELLO or self.owner_conn.caps is None:
            return
        if self.qemu_conn.caps is None:
            return
        self.machine.handle(Event.HELLOS)
        # Same capabilities on both sides (always, as the hellos relay unchanged): a bulk
        # packet's bytes are valid on the other side as they are.
        self._frames = self.owner_conn.caps == self.qemu_conn.caps
        try:
            self._drain(other)
        except ProtocolError as exc:
            self._malformed(other, str(exc))

    # -- probing and deciding ----------------------------------------------------------------

    def _start_probe(self) -> None:
        self._probe = probe_steps()
        self.probe_deadline = self.clock() + self.probe_timeout
        self._ask(next(self._probe))

    def _ask(self, request: tuple[int, int, int]) -> None:
        value, index, length = request
        self._probe_id = PROBE_ID_BASE + self._probe_count % 0xFFFF
        self._probe_count += 1
        self._send_owner(ControlPacket(0x80, REQUEST_GET_DESCRIPTOR,
                                       REQUESTTYPE_IN_STANDARD_DEVICE, 0, value, index, length,
                                       id=self._probe_id))  # fmt: skip

    def _stop_probe(self) -> None:
        if self._probe is not None:
            self._probe.close()
        self._probe = self._probe_id = self.probe_deadline = None

    def _probe_answer(self, reply: ControlPacket) -> None:
        assert self._probe is not None
        try:
            if reply.status != Status.SUCCESS:
                raise ProbeFailed(f"GET_DESCRIPTOR {reply.value:#06x} answered status "
                                  f"{reply.status}")  # fmt: skip
            self._ask(self._probe.send(reply.data))
        except StopIteration as done:
            self._probed(done.value)
        except ProbeFailed as exc:
            self._probe_failed(exc)

    def probe_timed_out(self) -> None:
        """Called once ``probe_deadline`` has passed: a device that did not answer is denied."""
        if self.state is State.PROBING and self.probe_deadline is not None:
            self._probe_failed(None)

    def _probe_failed(self, exc: ProbeFailed | Contradiction | None) -> None:
        what = "descriptors contradict the announcement" if isinstance(
            exc, Contradiction) else "probe failed"  # fmt: skip
        reason = f"{what}: {str(exc or '') or 'no answer in time'}"
        assert self.connect is not None
        self._stop_probe()
        self._deny(Decision(Action.REJECT, reason), _announced(self.connect))

    def _probed(self, result: ProbeResult) -> None:
        connect = self.connect
        assert connect is not None
        self._stop_probe()
        caps = self.owner_conn.caps or Capability(0)
        bcd = bool(caps & Capability.CONNECT_DEVICE_VERSION)
        try:
            device = reconcile(connect, self.interface_info, result, bcd_announced=bcd)
        except Contradiction as exc:
            self._probe_failed(exc)
            return
        self.device, self.probe_result = device, result
        decision = self.decide(device)
        if not decision.allowed:
            self._deny(decision, device)
            return
        self.machine.handle(Event.ALLOWED)
        self._forward_held()
        self._audit("usb.allowed", reason=decision.reason)

    def admit(self, decision: Decision) -> bool:
        """Forward a device the rules blocked earlier and now allow, without a replug (live
        allow): the held announcement goes to QEMU. False if there is nothing to admit."""
        if (
            not self.machine.can(Event.ADMITTED)
            or self.probe_result is None  # denied by its probe, not by the rules
            or self.connect is None
            or self._qemu_refused
            or not decision.allowed
        ):
            return False
        self.machine.handle(Event.ADMITTED)
        self._forward_held()
        self._audit("usb.allowed", reason=f"rules changed: {decision.reason}")
        return True

    def _forward_held(self) -> None:
        for packet in (self.interface_info, self.ep_info, self.connect):
            if packet is not None:
                self._send_qemu(packet)

    def _deny(self, decision: Decision, device: Device) -> None:
        self.device = device
        self.machine.handle(Event.DENIED)
        self._audit("usb.denied", action=str(decision.action), reason=decision.reason)
        self._reject_owner()
        if decision.action is Action.REJECT:
            self.close()

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
            detail["latency_ms"] = round((self.clock() - since) * 1000, 2)
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

    def close(self, *, hung_up: bool = False) -> None:
        """End the session (idempotent); ``hung_up``: a peer went away while attached."""
        if self.closed:
            return
        if hung_up and self.state is State.ATTACHED:
            self._audit("usb.detached", reason="connection closed")
        self._stop_probe()
        self.machine.handle(Event.CLOSE)

    # -- helpers -----------------------------------------------------------------------------

    def _send_owner(self, packet: Packet | Frame) -> None:
        if not self.closed:
            self._to_owner.append(_wire(self.owner_conn, packet))

    def _send_qemu(self, packet: Packet | Frame) -> None:
        if not self.closed:
            self._to_qemu.append(_wire(self.qemu_conn, packet))

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


def _wire(conn: Connection, packet: Packet | Frame) -> bytes:
    """``packet``'s bytes for ``conn``'s peer (a Frame's own: both sides' capabilities match)."""
    return packet.raw if isinstance(packet, Frame) else conn.send(packet)
