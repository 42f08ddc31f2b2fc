"""The asyncio gateway of one VM: listens for owners, relays each to a free QEMU usb-redir slot.

One ``Gateway`` per VM: alone in `usbgate run`, or one of many in one process under a
``usbgate.host.Host`` (``shared=True``), which then owns the rule source and the watching.
Owners (``usbredirect --to HOST:PORT``) connect to ``listen``; each connection takes the
first free ``--qemu`` slot (one per ``-device usb-redir`` of the VM), and a ``Session``
relays it under the VM's rules.

Revocation and live allow: a watcher polls the RuleSource every ``poll_interval`` (10 ms).
When the rules change it re-judges every attached device and revokes those no longer
allowed, in the same loop iteration: the device_disconnect is on its way to QEMU a fraction
of a millisecond after the change is seen, well within the 50 ms target. A device blocked
earlier (its owner still connected) that the new rules allow is forwarded the same way.

With a ``state_file``, the same watcher publishes the devices attached now (slot, owner,
VID:PID, class, serial, since) whenever they change, replaced atomically
(nbd_plugin/osutil/statefile.py): `vmshield status` reads it. It is removed on stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbd_plugin.osutil import statefile
from usbgate.addresses import READ_SIZE, Address, open_stream, start_server
from usbgate.auditing import REFUSAL_WINDOW, DenialSink, Refusals
from usbgate.errors import ProtocolError, RuleSourceError
from usbgate.rules.policy import Action, Decision, Device, Rule, decide
from usbgate.session import IDLE_TIMEOUT, PROBE_TIMEOUT, Session, State
from usbgate.sources import AuditSink, RuleSource
from usbgate.usbredir.codec import Connection
from usbgate.usbredir.packets import Hello
from usbgate.usbredir.wire import Role

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.010
# An owner must send its hello this soon after connecting, before it gets a slot.
HELLO_TIMEOUT = 5.0
# Connections at once from one IP address (or one local uid), handshakes and sessions.
MAX_PER_PEER = 4


class Gateway:
    """Forwards whitelisted USB devices of one VM and detaches revoked ones."""

    def __init__(
        self,
        vm: str,
        listen: Address,
        qemu_slots: Sequence[Address],
        rules: RuleSource,
        audit: AuditSink,
        *,
        poll_interval: float = POLL_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        hello_timeout: float = HELLO_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_per_peer: int = MAX_PER_PEER,
        refusal_window: float = REFUSAL_WINDOW,
        state_file: Path | None = None,
        shared: bool = False,
    ) -> None:
        """``shared``: the rule source serves other gateways too (a Host): this gateway
        neither watches it (the host polls it for every VM and calls ``apply``) nor closes it."""
        if not qemu_slots:
            raise ValueError("at least one QEMU usb-redir slot is needed")
        self.vm = vm
        self.listen = listen
        self.qemu_slots = list(qemu_slots)
        self.rule_source = rules
        self.audit = audit
        self.poll_interval = poll_interval
        self.probe_timeout = probe_timeout
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout
        self.max_per_peer = max_per_peer
        self.shared = shared
        self.refusals = Refusals(audit, vm, window=refusal_window)
        self.denials = DenialSink(audit, window=refusal_window)
        self._per_peer: dict[str, int] = {}
        self.rules: list[Rule] = []
        self.sessions: dict[int, Session] = {}
        self._reserved: set[int] = set()
        self._server: asyncio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.revocations: collections.deque[float] = collections.deque(maxlen=1000)
        """Seconds from seeing a rule change to having detached the device (latest 1000)."""
        self.admissions: collections.deque[float] = collections.deque(maxlen=1000)
        """Seconds from seeing a rule change to forwarding a blocked device (latest 1000)."""
        self.state_file = state_file
        self._published: list[dict[str, Any]] | None = None
        self._since: dict[tuple[int, str], float] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the rules (RuleSourceError if they cannot be read), then listen and watch."""
        self.rules = await self.rule_source.aload(self.vm)
        self._server = await start_server(self.listen, self._accept)
        self._publish()
        if not self.shared:
            self._watcher = asyncio.create_task(self._watch())
        log.info("usbgate for vm %s listening on %s, %d slot(s), %d rule(s)",
                 self.vm, self.listen, len(self.qemu_slots), len(self.rules))  # fmt: skip

    @property
    def bound_address(self) -> Address:
        """The listening address, with the real port when ``listen`` asked for port 0."""
        if self._server is not None and self.listen.kind == "tcp":
            host, port = self._server.sockets[0].getsockname()[:2]
            return Address("tcp", host=host, port=port)
        return self.listen

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.stop()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions.values()):
            session.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if not self.shared:
            self.rule_source.close()
        self.refusals.flush(everything=True)
        self.denials.flush(everything=True)
        if self.state_file is not None:
            with contextlib.suppress(OSError):
                self.state_file.unlink()

    # -- policy ----------------------------------------------------------------------------

    def decide(self, device: Device) -> Decision:
        """Judge ``device`` with the newest rules (polls once more right before deciding)."""
        self._refresh()
        return decide(self.rules, device)

    def _refresh(self) -> None:
        """Pick up changed rules and enforce them at once. Unreadable rules deny everything."""
        seen = time.monotonic()
        try:
            new: list[Rule] | RuleSourceError | None = self.rule_source.poll(self.vm)
        except RuleSourceError as exc:
            new = exc
        self.apply(new, seen)

    def apply(self, new: list[Rule] | RuleSourceError | None, seen: float) -> None:
        """Enforce what a poll of the rule source returned for this VM (None: no change; an
        error: the rules are unknown, so every device is denied), seen at ``seen``."""
        if isinstance(new, RuleSourceError):
            if self.rules:
                log.error("vm %s: rules unreadable, denying every device: %s", self.vm, new)
                self.audit.record("usb.rules.unreadable", self.vm, {"error": str(new)})
            new = [] if self.rules else None
        if new is not None:
            self.rules = new
            self._enforce(seen)
            log.info("vm %s: rules changed (%d rule(s))", self.vm, len(new))

    def flush(self) -> None:
        """Write the aggregated refusal and denial rows that are due, and the attached devices
        if they changed (every poll)."""
        self.refusals.flush()
        self.denials.flush()
        self._publish()

    @property
    def attached(self) -> int:
        """How many devices this VM's guest has now."""
        return sum(1 for s in self.sessions.values() if s.state is State.ATTACHED)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self._refresh()
            self.flush()

    def attached_devices(self) -> list[dict[str, Any]]:
        """The devices attached to the VM now, by slot: who offers them, what they are and
        since when (epoch seconds)."""
        out = []
        now = time.time()
        live: dict[tuple[int, str], float] = {}
        for slot, session in sorted(self.sessions.items()):
            device = session.device
            if device is None or session.state is not State.ATTACHED:
                continue
            what = device.describe()
            key = (slot, f"{what['vid_pid']}/{what['serial']}")
            live[key] = self._since.get(key, now)
            out.append({"slot": slot, "owner": session.peer, **what, "since": live[key]})
        self._since = live
        return out

    def _publish(self) -> None:
        """Write the attached devices to the state file if they changed."""
        if self.state_file is None:
            return
        now = self.attached_devices()
        if now == self._published:
            return
        with contextlib.suppress(OSError):
            statefile.publish(self.state_file, {"pid": os.getpid(), "vm": self.vm,
                                                "attached": now})  # fmt: skip
            self._published = now

    def _enforce(self, seen: float) -> None:
        """Revoke every attached device the current rules no longer allow; forward every
        blocked (still plugged, not rejected) device they now allow."""
        for session in list(self.sessions.values()):
            if session.device is None or session.state not in (State.ATTACHED, State.BLOCKED):
                continue
            decision = decide(self.rules, session.device)
            if session.state is State.BLOCKED:
                if decision.allowed and session.admit(decision):
                    self.admissions.append(time.monotonic() - seen)
                continue
            if not decision.allowed:
                why = Decision(Action.REJECT, f"rules changed: {decision.reason}", decision.rule)
                session.revoke(why, since=seen)
                self.revocations.append(time.monotonic() - seen)

    # -- connections -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, host = _peer_name(writer), _peer_host(writer)
        if self._per_peer.get(host, 0) >= self.max_per_peer:
            self._refuse(writer, "usb.denied", host, f"more than {self.max_per_peer} connection(s) "
                         f"at once from {host}")  # fmt: skip
            return
        self._per_peer[host] = self._per_peer.get(host, 0) + 1
        try:
            greeting = await self._handshake(reader, writer, host)
            if greeting is not None:
                await self._relay(reader, writer, peer, host, greeting)
        finally:
            self._per_peer[host] -= 1
            if not self._per_peer[host]:
                del self._per_peer[host]

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         host: str) -> bytes | None:  # fmt: skip
        """The owner's first bytes, up to and including its hello; None if it sent none in
        time (refused: it holds no slot and no QEMU connection while it is silent)."""
        hello = Connection(Role.GUEST)
        greeting = bytearray()
        try:
            async with asyncio.timeout(self.hello_timeout):
                while True:
                    data = await reader.read(READ_SIZE)
                    if not data:
                        writer.close()
                        return None
                    greeting += data
                    hello.receive_data(data)
                    if isinstance(hello.next_event(), Hello):
                        return bytes(greeting)
        except TimeoutError:
            reason = f"no usbredir hello within {self.hello_timeout:g} s"
            self._refuse(writer, "usb.denied", host, reason)
        except ProtocolError as exc:
            self._refuse(writer, "usb.malformed", host, f"not a usbredir hello: {exc}")
        except (ConnectionError, OSError):
            writer.close()
        return None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
                     host: str, greeting: bytes) -> None:  # fmt: skip
        slot = next((n for n in range(len(self.qemu_slots)) if n not in self._reserved), None)
        if slot is None:
            self._refuse(writer, "usb.denied", host, "every usb-redir slot is in use")
            return
        self._reserved.add(slot)
        try:
            try:
                qemu = await open_stream(self.qemu_slots[slot])
            except OSError as exc:
                reason = f"cannot reach QEMU at {self.qemu_slots[slot]}: {exc}"
                self._refuse(writer, "usb.error", host, reason, slot=slot)
                return
            session = Session(vm=self.vm, slot=slot, peer=peer, owner=(reader, writer), qemu=qemu,
                              decide=self.decide, audit=self.denials,
                              probe_timeout=self.probe_timeout, idle_timeout=self.idle_timeout,
                              greeting=greeting)  # fmt: skip
            self.sessions[slot] = session
            await session.run()
        finally:
            self.sessions.pop(slot, None)
            self._reserved.discard(slot)

    def _refuse(self, writer: asyncio.StreamWriter, action: str, host: str, reason: str,
                **detail: Any) -> None:  # fmt: skip
        """Hang up on a connection usbgate will not serve; audited, aggregated per peer."""
        self.refusals.refused(action, host, reason, **detail)
        writer.close()


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix"


def _peer_host(writer: asyncio.StreamWriter) -> str:
    """Who is connecting, for the per-peer limit: the IP address, or a unix socket's uid."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            return f"unix uid {uid}"
    return "unix"
