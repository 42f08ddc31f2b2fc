"""One gateway session's I/O: an owner's socket and one QEMU usb-redir chardev around a Relay.

Everything the session decides is in usbgate.relay (sans-IO: packets, probe, policy) and
usbgate.state (the state table). This module only reads both sockets, feeds the bytes to the
relay, writes what the relay wants written, arms the probe's timer and closes the sockets
once the relay is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from usbgate.addresses import READ_SIZE
from usbgate.policy import Decision, Device
from usbgate.relay import PROBE_TIMEOUT, Decider, Relay
from usbgate.sources import AuditSink
from usbgate.state import State

log = logging.getLogger(__name__)

__all__ = ["PROBE_TIMEOUT", "Session", "State"]


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
        greeting: bytes = b"",
    ) -> None:
        self.vm, self.slot, self.peer = vm, slot, peer
        self.owner_reader, self.owner_writer = owner
        self.qemu_reader, self.qemu_writer = qemu
        self.relay = Relay(vm=vm, slot=slot, peer=peer, decide=decide, audit=audit,
                           probe_timeout=probe_timeout)  # fmt: skip
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
        pumps = [
            asyncio.create_task(self._pump("owner", self.owner_reader)),
            asyncio.create_task(self._pump("qemu", self.qemu_reader)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.relay.close(hung_up=True)
            self._after()
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (self.owner_writer, self.qemu_writer):
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _pump(self, side: str, reader: asyncio.StreamReader) -> None:
        receive = self.relay.receive_owner if side == "owner" else self.relay.receive_qemu
        try:
            while not self.relay.closed:
                data = await reader.read(READ_SIZE)
                receive(data)
                self._after()
                await self._drain()
        except (ConnectionError, OSError) as exc:
            self.relay.connection_lost(side, str(exc))
            self._after()

    async def _drain(self) -> None:
        for writer in (self.owner_writer, self.qemu_writer):
            if not writer.is_closing():
                await writer.drain()

    def _after(self) -> None:
        """Write what the relay produced, (re)arm the probe timer, close once it is closed."""
        for writer, out in ((self.qemu_writer, self.relay.take_qemu_bytes()),
                            (self.owner_writer, self.relay.take_owner_bytes())):  # fmt: skip
            if out and not writer.is_closing():
                writer.write(out)
        deadline = self.relay.probe_deadline
        if self._timer is not None and (deadline is None or self._timer.when() != deadline):
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._timer is None and not self.relay.closed:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._timed_out)
        if self.relay.closed:
            self._close_sockets()

    def _timed_out(self) -> None:
        self._timer = None
        self.relay.probe_timed_out()
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
