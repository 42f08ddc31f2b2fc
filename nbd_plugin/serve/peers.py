"""Which VM is on the other end of an NBD connection, and may it open this disk (#20 B2, B3).

Every QEMU on a host runs as the same user, so the socket's permissions cannot tell one VM
from another, and libvirt runs no hook on hotplug (`virsh attach-device`) nor notices a
socket named through an alias. A server started with ``bind=UUID`` therefore decides per
connection: in ``open()`` it asks nbdkit for the client's pid (``nbdkit_peer_pid``, in the
nbdkit binary, reached through ctypes) and judges that process from /proc:

- its cgroup: libvirt puts each QEMU in a machine scope
  (``machine-qemu\\x2dID\\x2dNAME.scope``). Membership is inherited by every child and only
  root can move a process into another cgroup, so a QEMU (compromised or not) and whatever
  it starts stay in their domain's scope. With ``bind_domain=NAME`` a peer in any machine
  scope other than NAME's is refused, whatever its command line says.
- its command line: QEMU's ``-uuid`` must be the bound uuid. Whoever starts a process
  chooses its argv (and a process can rewrite its own), so this alone only stops clients
  that do not lie: nbdinfo, nbdcopy, a QEMU of another VM started by hand.

Nothing here does I/O except `read_peer` (files under /proc) and `nbdkit_peer` (ctypes): the
decision (`Binding.check`) is a plain function of what was read.
"""

from __future__ import annotations

import ctypes
import re
import uuid as uuidmod
from dataclasses import dataclass
from pathlib import Path

from nbd_plugin.errors import VmshieldError

#: a systemd unit name's escapes (`\x2d` for "-")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
#: libvirt's machine scope, unescaped: machine-qemu-ID-NAME.scope
_SCOPE = re.compile(r"machine-(qemu-(\d+)-.*)\.scope")
#: libvirt keeps these in a machine name (virDomainMachineNameAppendValid)
_HOSTNAME_CHARS = re.compile(r"[A-Za-z0-9-]")
_MACHINE_NAME_MAX = 64


class PeerRefused(VmshieldError):
    """The connecting process is not the bound VM's QEMU; the message names it."""


def parse_uuid(value: str) -> str:
    """The canonical lower-case form of a VM uuid (ValueError if it is not one)."""
    return str(uuidmod.UUID(value.strip()))


def machine_name(domain_id: int, domain: str) -> str:
    """The machine name libvirt derives for a domain (what its scope is named after):
    ``qemu-ID-`` then the name's hostname characters, a run of "." or "-" kept once and
    never first, cut at 64 characters, no trailing "." or "-"."""
    out = f"qemu-{domain_id}-"
    skip = True
    for ch in domain:
        if len(out) >= _MACHINE_NAME_MAX:
            break
        if ch in ".-":
            if not skip:
                out += ch
            skip = True
            continue
        skip = False
        if _HOSTNAME_CHARS.fullmatch(ch):
            out += ch
    return out.rstrip("-.")


def machine_scope(cgroup: str) -> tuple[str, int] | None:
    """(machine name, domain id) of the libvirt machine scope in a /proc/PID/cgroup text."""
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        for part in path.split("/"):
            unescaped = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), part)
            m = _SCOPE.fullmatch(unescaped)
            if m:
                return m.group(1), int(m.group(2))
    return None


def qemu_uuid(argv: list[bytes]) -> str | None:
    """The ``-uuid`` of a QEMU command line; None if absent, malformed or given twice
    with different values."""
    found: set[str] = set()
    for i, arg in enumerate(argv):
        value: bytes | None = None
        if arg in (b"-uuid", b"--uuid") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith((b"-uuid=", b"--uuid=")):
            value = arg.split(b"=", 1)[1]
        if value is not None:
            try:
                found.add(parse_uuid(value.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                return None
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class Peer:
    """What /proc says about the connecting process."""

    pid: int
    program: str  #: basename of argv[0], for the log line
    uuid: str | None  #: QEMU's -uuid
    scope: tuple[str, int] | None  #: libvirt machine scope (machine name, domain id)

    def describe(self) -> str:
        where = f" in libvirt machine {self.scope[0]}" if self.scope else ""
        return f"pid {self.pid} ({self.program or '?'}{where})"


def read_peer(pid: int, proc: Path = Path("/proc")) -> Peer:
    """Read the peer from /proc (an exited process reads as one with nothing to show)."""
    try:
        argv = [a for a in (proc / str(pid) / "cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        argv = []
    try:
        cgroup = (proc / str(pid) / "cgroup").read_text(errors="replace")
    except OSError:
        cgroup = ""
    program = argv[0].rsplit(b"/", 1)[-1].decode(errors="replace") if argv else ""
    return Peer(pid, program, qemu_uuid(argv), machine_scope(cgroup))


@dataclass(frozen=True)
class Binding:
    """The VM a server is bound to: its uuid, and the libvirt domain name when known."""

    uuid: str
    domain: str | None = None

    def check(self, peer: Peer) -> None:
        """PeerRefused unless `peer` may be this VM's QEMU."""
        if peer.pid <= 0:
            raise PeerRefused(
                f"a client nbdkit cannot identify (no peer pid): only VM {self.uuid} may connect"
            )
        if self.domain is not None and peer.scope is not None:
            expected = machine_name(peer.scope[1], self.domain)
            if peer.scope[0] != expected:
                raise PeerRefused(
                    f"{peer.describe()}: another libvirt domain's process, "
                    f"not domain {self.domain}'s (VM {self.uuid})"
                )
        if peer.uuid != self.uuid:
            carries = f"-uuid {peer.uuid}" if peer.uuid else "no -uuid"
            raise PeerRefused(f"{peer.describe()} carries {carries}, not VM {self.uuid}'s QEMU")


def nbdkit_peer() -> int:
    """The connecting client's pid, from nbdkit's C API (call it in ``open()``); -1 if
    nbdkit cannot tell (not a unix socket, or no nbdkit in this process)."""
    try:
        fn = ctypes.CDLL(None).nbdkit_peer_pid
    except (AttributeError, OSError):
        return -1
    fn.restype = ctypes.c_int64
    fn.argtypes = []
    return int(fn())
