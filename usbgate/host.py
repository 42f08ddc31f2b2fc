"""One usbgate for every VM of a host: many Gateways in one process, one rule source, one watcher.

`usbgate run` is one process per VM, each with its own keystore connection (on PostgreSQL its
own LISTEN) and ~16 MiB of private memory. ``Host`` runs one ``Gateway`` per VM in one event
loop instead: each VM keeps its own listening address, usb-redir slots, sessions and their
sans-IO relays, exactly as under `usbgate run`, while the rule source is shared (one SQLite
connection, or one PostgreSQL LISTEN connection for all VMs) and polled once per interval for
every VM (``RuleSource.poll_many``); a change is applied to the gateway of the VM it names
only, so revoking or allowing a device of one VM never touches another VM's sessions.

VMs are given at start (``--vm``) or by a directory of per-VM files (``read_vm_dir``: the
`/etc/vmshield/usbgate/NAME.conf` files of usbgate@NAME.service), which ``Host.sync`` applies
again on SIGHUP. They are also added and removed while it runs, over a unix control socket
(``ControlServer``): one JSON request per line, answered by one JSON line. Only root, the
server's own user, or members of the group named at start (``--control-group``, checked with
SO_PEERCRED and the peer's supplementary groups) may use it; every add and remove is
audited, refusals logged.

    {"op": "add", "vm": "web1", "listen": "tcp:0.0.0.0:4000", "qemu": ["unix:/run/..."]}
    {"op": "remove", "vm": "web1"}
    {"op": "list"}
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbd_plugin.osutil import jsonctl
from usbgate.addresses import Address, parse_address
from usbgate.errors import RuleSourceError, UsbgateError
from usbgate.gateway import POLL_INTERVAL, Gateway
from usbgate.sources import AuditSink, RuleSource

log = logging.getLogger(__name__)

#: where `usbgate host` listens for add/remove/list unless told otherwise
DEFAULT_CONTROL = "/run/vmshield/usbgate.ctl"
#: the longest control request read (one JSON line)
MAX_REQUEST = 64 * 1024
#: seconds a control client has to send its request
REQUEST_TIMEOUT = 5.0
VM_NAME_MAX = 128


class HostError(UsbgateError):
    """A VM could not be added or removed (the message says why); nothing was changed."""


@dataclass(frozen=True)
class VmSpec:
    """One VM served by the host: where its owners connect, its QEMU usb-redir chardevs."""

    name: str
    listen: Address
    qemu: tuple[Address, ...]

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > VM_NAME_MAX or not self.name.isprintable():
            raise ValueError(f"{self.name!r}: a VM name is 1 to {VM_NAME_MAX} printable characters")
        if not self.qemu:
            raise ValueError(f"VM {self.name}: at least one QEMU usb-redir address is needed")

    @classmethod
    def parse(cls, text: str) -> VmSpec:
        """``NAME=LISTEN,QEMU[,QEMU...]`` (the addresses as `usbgate run` takes them)."""
        name, sep, rest = text.partition("=")
        parts = rest.split(",") if sep else []
        if len(parts) < 2:
            example = "web1=tcp:0.0.0.0:4000,unix:/run/vmshield/web1-usb0.sock"
            raise ValueError(f"{text!r}: expected NAME=LISTEN,QEMU[,QEMU...] (e.g. {example})")
        return cls(name, parse_address(parts[0]), tuple(parse_address(p) for p in parts[1:]))

    @classmethod
    def from_json(cls, obj: Any) -> VmSpec:
        """From a control request's ``vm``/``listen``/``qemu``; ValueError if malformed."""
        if not isinstance(obj, dict):
            raise ValueError("the request must be a JSON object")
        name, listen, qemu = obj.get("vm"), obj.get("listen"), obj.get("qemu")
        if not isinstance(name, str) or not isinstance(listen, str):
            raise ValueError('add needs "vm" and "listen" strings')
        if not isinstance(qemu, list) or not all(isinstance(q, str) for q in qemu):
            raise ValueError('add needs "qemu": a list of addresses')
        return cls(name, parse_address(listen), tuple(parse_address(q) for q in qemu))

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.name, "listen": str(self.listen), "qemu": [str(q) for q in self.qemu]}


class Host:
    """The gateways of every VM of this host, over one shared rule source and audit sink."""

    def __init__(
        self,
        rules: RuleSource,
        audit: AuditSink,
        *,
        poll_interval: float = POLL_INTERVAL,
        **gateway_options: Any,
    ) -> None:
        self.rule_source = rules
        self.audit = audit
        self.poll_interval = poll_interval
        self.gateway_options = gateway_options
        self.gateways: dict[str, Gateway] = {}
        self.specs: dict[str, VmSpec] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._changing = asyncio.Lock()

    async def start(self, specs: Iterable[VmSpec] = ()) -> None:
        """Serve ``specs`` (HostError, RuleSourceError or OSError if one cannot be: then none
        is served), then watch the rules of every VM."""
        try:
            for spec in specs:
                await self.add(spec, actor="startup")
        except BaseException:
            await self.stop()
            raise
        self._watcher = asyncio.create_task(self._watch())

    async def add(self, spec: VmSpec, *, actor: str = "control") -> Gateway:
        """Start serving one more VM (nothing to do if it is served with the same addresses).
        HostError if its name or addresses are taken, RuleSourceError if its rules cannot be
        read, OSError if it cannot listen."""
        async with self._changing:
            if spec.name in self.gateways:
                if self.specs[spec.name] == spec:  # the same again (a retried add): done
                    return self.gateways[spec.name]
                raise HostError(f"VM {spec.name} is already served (with other addresses)")
            for other in self.specs.values():
                taken = {other.listen, *other.qemu}
                for address in (spec.listen, *spec.qemu):
                    if address in taken:
                        raise HostError(f"{address} is already used by VM {other.name}")
            gateway = Gateway(spec.name, spec.listen, spec.qemu, self.rule_source, self.audit,
                              poll_interval=self.poll_interval, shared=True,
                              **self.gateway_options)  # fmt: skip
            try:
                await gateway.start()
            except BaseException:
                self.rule_source.forget(spec.name)
                raise
            self.gateways[spec.name] = gateway
            self.specs[spec.name] = spec
            self.audit.record("usb.host.added", spec.name, {**spec.to_json(), "by": actor})
            log.info("vm %s added: listening on %s", spec.name, gateway.bound_address)
            return gateway

    async def remove(self, name: str, *, actor: str = "control") -> None:
        """Stop serving VM ``name``: its owners are disconnected, its devices detached."""
        async with self._changing:
            gateway = self.gateways.pop(name, None)
            if gateway is None:
                raise HostError(f"VM {name} is not served")
            spec = self.specs.pop(name)
            try:
                await gateway.stop()
            finally:
                self.rule_source.forget(name)
                if spec.listen.kind == "unix":  # as `usbgate run` exits: no socket left behind
                    with contextlib.suppress(OSError):
                        Path(spec.listen.path).unlink()
            self.audit.record("usb.host.removed", name, {**spec.to_json(), "by": actor})
            log.info("vm %s removed", name)

    async def sync(self, wanted: dict[str, VmSpec], managed: set[str]) -> list[str]:
        """Make the VMs in ``managed`` (those that came from a directory) be ``wanted``:
        remove the ones gone or changed, add the new and changed ones. Every VM is tried;
        returns one line per VM that could not be added (the others are served)."""
        errors: list[str] = []
        for name in sorted(managed):
            if name in self.gateways and self.specs[name] != wanted.get(name):
                await self.remove(name, actor="reload")
        for name, spec in sorted(wanted.items()):
            if name in self.gateways:
                continue
            try:
                await self.add(spec, actor="reload")
            except (HostError, RuleSourceError) as exc:
                errors.append(f"VM {name}: {exc}")
            except OSError as exc:
                errors.append(f"VM {name}: cannot listen on {spec.listen}: {exc.strerror or exc}")
        return errors

    def listing(self) -> list[dict[str, Any]]:
        """Every served VM: its addresses, sessions and attached devices."""
        out = []
        for name in sorted(self.gateways):
            gateway = self.gateways[name]
            out.append({**self.specs[name].to_json(), "listening": str(gateway.bound_address),
                        "rules": len(gateway.rules), "sessions": len(gateway.sessions),
                        "attached": gateway.attached})  # fmt: skip
        return out

    def tick(self) -> None:
        """One poll of the shared rule source for every VM; each change goes to its VM only."""
        seen = time.monotonic()
        try:
            changes = self.rule_source.poll_many(list(self.gateways))
        except Exception as exc:  # any: the rules are unknown, deny every VM's devices
            log.error("rules unreadable: %s: %s", type(exc).__name__, exc)
            error = RuleSourceError(f"rules unreadable: {exc}")
            changes = dict.fromkeys(self.gateways, error)
        for name, new in changes.items():
            gateway = self.gateways.get(name)
            if gateway is not None:
                self._guarded(name, gateway.apply, new, seen)
        for name, gateway in self.gateways.items():
            self._guarded(name, gateway.flush)

    @staticmethod
    def _guarded(name: str, step: Callable[..., None], *args: Any) -> None:
        """One VM's step; a bug in it is logged and must not stop the watching of the rest."""
        try:
            step(*args)
        except Exception as exc:  # any: isolation between VMs
            log.error("vm %s: %s failed: %s: %s", name, step.__name__, type(exc).__name__, exc)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.tick()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for name in list(self.gateways):
            with contextlib.suppress(HostError):
                await self.remove(name, actor="shutdown")
        self.rule_source.close()


# -- the control socket ------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a control connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    def groups(self) -> set[int]:
        """Primary and supplementary groups, the latter read from /proc/PID/status."""
        found = {self.gid}
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("Groups:"):
                    found.update(int(g) for g in line.split()[1:])
        return found


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", creds))


def group_id(name: str) -> int:
    """The gid of group ``name``; HostError if there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise HostError(f"no group named {name!r}") from None


class ControlServer:
    """The host's control socket: add, remove and list VMs (root, our user, or ``group``)."""

    def __init__(self, host: Host, path: str | Path, *, group: int | None = None,
                 state: str | Path | None = None) -> None:  # fmt: skip
        """``state``: a file where the VMs added over the socket are kept, so that a host
        restarted (after a crash, an upgrade) serves them again (``restore``)."""
        self.host, self.path, self.group = host, Path(path), group
        self.state_file = None if state is None else Path(state)
        self.added: dict[str, VmSpec] = {}  # the VMs added over the socket, still served
        self._server: asyncio.Server | None = None

    async def restore(self) -> list[str]:
        """Serve again the VMs the state file lists; one line per VM that cannot be."""
        if self.state_file is None:
            return []
        try:
            listed = json.loads(self.state_file.read_text())["vms"]
            specs = [VmSpec.from_json(v) for v in listed]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return [f"{self.state_file}: unreadable, starting without it ({exc})"]
        errors = []
        for spec in specs:
            try:
                await self.host.add(spec, actor="restore")
                self.added[spec.name] = spec
            except (HostError, RuleSourceError) as exc:
                errors.append(f"VM {spec.name}: {exc}")
            except OSError as exc:
                errors.append(f"VM {spec.name}: cannot listen: {exc.strerror or exc}")
        self._save()
        return errors

    def _save(self) -> None:
        """Write the state file atomically (a temporary file, then rename), mode 0600."""
        if self.state_file is None:
            return
        data = json.dumps({"vms": [s.to_json() for s in self.added.values()]}, indent=1)
        tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data + "\n")
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.error("cannot write %s: %s", self.state_file, exc.strerror or exc)

    def allowed(self, peer: Peer) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        return self.group is not None and self.group in peer.groups()

    async def start(self) -> None:
        if self.path.is_socket():
            self.path.unlink()  # left by a server that died
        old = os.umask(0o117 if self.group is not None else 0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, str(self.path),
                                                           limit=MAX_REQUEST)  # fmt: skip
        finally:
            os.umask(old)
        if self.group is not None:
            os.chown(self.path, -1, self.group)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            error = "no request"
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    line = await reader.readline()
            except (TimeoutError, ValueError) as exc:  # ValueError: a line over the limit
                line, error = b"", f"no complete request: {exc or 'timed out'}"
            if not self.allowed(peer):
                log.warning("control request from uid %d (pid %d) refused", peer.uid, peer.pid)
                why = f"uid {peer.uid} may not control this usbgate (root, its user or group only)"
                reply: dict[str, Any] = {"ok": False, "error": why}
            elif not line:
                reply = {"ok": False, "error": error}
            else:
                reply = await self._answer(line, f"uid {peer.uid} pid {peer.pid}")
            writer.write(json.dumps(reply, sort_keys=True).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes, actor: str) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op = request.get("op") if isinstance(request, dict) else None
            if op == "list":
                return {"ok": True, "pid": os.getpid(), "vms": self.host.listing()}
            if op == "add":
                spec = VmSpec.from_json(request)
                gateway = await self.host.add(spec, actor=actor)
                self.added[spec.name] = spec
                self._save()
                listening = str(gateway.bound_address)
                return {"ok": True, "pid": os.getpid(), "vm": {**spec.to_json(),
                                                               "listening": listening}}  # fmt: skip
            if op == "remove":
                name = request.get("vm")
                if not isinstance(name, str):
                    raise ValueError('remove needs a "vm" string')
                await self.host.remove(name, actor=actor)
                if self.added.pop(name, None) is not None:
                    self._save()
                return {"ok": True, "vm": {"vm": name}}
            raise ValueError(f"unknown op {op!r} (add, remove, list)")
        except (ValueError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        except (HostError, RuleSourceError) as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:
            return {"ok": False, "error": f"cannot listen: {exc.strerror or exc}"}


def control_request(path: str | Path, request: dict[str, Any], *, timeout: float = 30.0
                    ) -> dict[str, Any]:  # fmt: skip
    """Send one request to a running host's control socket; its answer.

    HostError if the server cannot be reached or refuses (its one-line reason).
    """
    return jsonctl.call(path, request, timeout=timeout, who="the usbgate host", error=HostError)


def read_vm_dir(path: str | Path) -> tuple[dict[str, VmSpec], dict[str, str]]:
    """The VMs of a directory of ``NAME.conf`` files (``USBGATE_LISTEN=ADDR`` and
    ``USBGATE_QEMU=ADDR[ ADDR...]``, as usbgate@NAME.service reads them; ``#`` comments,
    optional quotes), and by VM name, why a file could not be read. HostError if the
    directory cannot be listed."""
    specs: dict[str, VmSpec] = {}
    errors: dict[str, str] = {}
    try:
        if not Path(path).is_dir():
            raise HostError(f"{path} is not a directory")
        files = sorted(Path(path).glob("*.conf"))
    except OSError as exc:
        raise HostError(f"cannot list {path}: {exc.strerror or exc}") from exc
    for file in files:
        try:
            settings: dict[str, str] = {}
            for line in file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                key, sep, value = line.partition("=")
                if not sep:
                    raise ValueError(f"not KEY=VALUE: {line!r}")
                settings[key.strip()] = value.strip().strip("'\"")
            if "USBGATE_LISTEN" not in settings or "USBGATE_QEMU" not in settings:
                raise ValueError("USBGATE_LISTEN and USBGATE_QEMU are both needed")
            qemu = settings["USBGATE_QEMU"].replace(",", " ").split()
            specs[file.stem] = VmSpec(file.stem, parse_address(settings["USBGATE_LISTEN"]),
                                      tuple(parse_address(q) for q in qemu))  # fmt: skip
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            errors[file.stem] = f"{file}: {getattr(exc, 'strerror', None) or exc}"
    return specs, errors


def parse_specs(texts: Sequence[str]) -> list[VmSpec]:
    """``--vm`` values; ValueError naming the first bad one."""
    return [VmSpec.parse(t) for t in texts]
