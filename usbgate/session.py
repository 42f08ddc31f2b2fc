"""One gateway session's I/O: an owner's socket and one QEMU usb-redir chardev around a Relay.

Everything the session decides is in usbgate.relay (sans-IO: packets, probe, policy) and
usbgate.state (the state table). This module only reads both sockets, feeds the bytes to the
relay, writes what the relay wants written, arms the probe's timer and closes the sockets
once the relay is closed.

The streams the gateway opened are taken over by a protocol of the session's (``_Side``):
bytes are fed to the relay in the transport's own callback and what the relay produced is
written at once, without waking a task per read (a bulk copy is thousands of reads, each a
turn of the event loop saved). When one side's write buffer is full, the other side stops
being read until it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from usbgate.relay import IDLE_TIMEOUT, PROBE_TIMEOUT, Decider, Relay
from usbgate.rules.policy import Decision, Device
from usbgate.sources import AuditSink
from usbgate.state import State

log = logging.getLogger(__name__)

__all__ = ["IDLE_TIMEOUT", "PROBE_TIMEOUT", "Session", "State"]


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
        idle_timeout: float = IDLE_TIMEOUT,
        greeting: bytes = b"",
    ) -> None:
        self.vm, self.slot, self.peer = vm, slot, peer
        self.owner_reader, self.owner_writer = owner
        self.qemu_reader, self.qemu_writer = qemu
        self.relay = Relay(vm=vm, slot=slot, peer=peer, decide=decide, audit=audit,
                           probe_timeout=probe_timeout, idle_timeout=idle_timeout)  # fmt: skip
        self._greeting = greeting
        self._timer: asyncio.TimerHandle | None = None
        self.closed = asyncio.Event()

    @property
    def state(self) -> State:
        return self.relay.state

    @property
    def device(self) -> Device | None:
        return self.relay.device

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay until either side closes, misbehaves, or the session is revoked."""
        if self._greeting:  # bytes the gateway read before the session began (the hello)
            self.relay.receive_owner(self._greeting)
            self._after()
        sides: list[_Side] = []
        try:
            for side, reader, writer, other in (
                ("owner", self.owner_reader, self.owner_writer, self.qemu_writer),
                ("qemu", self.qemu_reader, self.qemu_writer, self.owner_writer),
            ):
                sides.append(_Side(self, side, other.transport))
                sides[-1].take_over(reader, writer.transport)
            await self.closed.wait()
        finally:
            self.relay.close(hung_up=True)
            self._after()
            # The sockets' ends, as wait_closed() (bounded: one may have ended before take_over).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*(s.gone.wait() for s in sides)), 1.0)

    def received(self, side: str, data: bytes) -> None:
        """Bytes read from ``side`` (``b""``: it hung up), fed to the relay and answered."""
        if side == "owner":
            self.relay.receive_owner(data)
        else:
            self.relay.receive_qemu(data)
        self._after()

    def lost(self, side: str, exc: Exception | None) -> None:
        if exc is None:
            self.relay.close(hung_up=True)
        else:
            self.relay.connection_lost(side, str(exc))
        self._after()

    def _after(self) -> None:
        """Write what the relay produced, (re)arm the timer, close once it is closed."""
        for writer, out in ((self.qemu_writer, self.relay.take_qemu_bytes()),
                            (self.owner_writer, self.relay.take_owner_bytes())):  # fmt: skip
            if out and not writer.is_closing():
                writer.write(out)
        deadline = self.relay.deadline
        if self._timer is not None and (deadline is None or self._timer.when() != deadline):
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._timer is None and not self.relay.closed:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._timed_out)
        if self.relay.closed:
            self._close_sockets()

    def _timed_out(self) -> None:
        self._timer = None
        self.relay.timed_out()
        self._after()

    # -- revocation and closing --------------------------------------------------------------

    def revoke(self, decision: Decision, *, since: float | None = None) -> None:
        """Detach the forwarded device now: device_disconnect to QEMU, filter_reject, close."""
        self.relay.revoke(decision, since=since)
        self._after()

    def admit(self, decision: Decision) -> bool:
        """Live allow: forward a device blocked earlier that the rules now allow."""
        admitted = self.relay.admit(decision)
        self._after()
        return admitted

    def close(self) -> None:
        self.relay.close()
        self._after()

    def _close_sockets(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for writer in (self.qemu_writer, self.owner_writer):
            with contextlib.suppress(Exception):
                writer.close()
        self.closed.set()


class _Side(asyncio.Protocol):
    """One socket of a session: what it reads goes to the relay; its write buffer running
    full pauses reading the other socket (whose bytes would only pile up behind it)."""

    def __init__(self, session: Session, side: str, other: asyncio.BaseTransport) -> None:
        self.session, self.side, self.other = session, side, other
        self.gone = asyncio.Event()

    def take_over(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        """Become ``transport``'s protocol; first feed what ``reader`` had buffered."""
        pending = bytes(getattr(reader, "_buffer", b""))
        at_eof = bool(getattr(reader, "_eof", False)) or reader.exception() is not None
        transport.set_protocol(self)
        if pending:
            self.session.received(self.side, pending)
        if at_eof:
            self.session.received(self.side, b"")
        elif isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
            transport.resume_reading()  # the reader may have paused it at its limit

    def data_received(self, data: bytes) -> None:
        self.session.received(self.side, data)

    def eof_received(self) -> bool:
        self.session.received(self.side, b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone.set()
        self.session.lost(self.side, exc)

    def pause_writing(self) -> None:
        if isinstance(self.other, asyncio.ReadTransport) and not self.other.is_closing():
            self.other.pause_reading()

    def resume_writing(self) -> None:
        if isinstance(self.other, asyncio.ReadTransport) and not self.other.is_closing():
            self.other.resume_reading()
