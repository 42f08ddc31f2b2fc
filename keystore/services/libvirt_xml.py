"""libvirt domain XML: what the hook reads from it, and the `<devices>` entries vmshield gives.

Where things live under the run directory RUN (default /run/vmshield, 0700, root's):

    RUN/nbd.sock           the host disk server: disk DISK is its export DISK
                           (`<source protocol='nbd' name='DISK'>`, as `vmshield disk serve`)
    RUN/nbd-control.sock   its control socket (root and the vmshield group)
    RUN/DISK.sock          the NBD socket of disk DISK served by an nbdkit of its own
                           (`vmshield libvirt devices --isolated`, `disk serve --isolated`)
    RUN/VM-usbN.sock       usb-redir slot N of VM: QEMU listens (`<source mode='bind'>`),
                           usbgate connects when an owner plugs a device in
    RUN/VM-usbgate.pid     the VM's usbgate (and .log)
    RUN/VM.domain          the domain whose prepare started them (release acts only for it)

QEMU listens on the usb-redir sockets (mode='bind') because usbgate opens its QEMU side per
owner connection; a `<reconnect>` element applies only to mode='connect' (QEMU as client)
and is therefore not used: QEMU's listener lives as long as the domain, and usbgate can be
restarted at any time without QEMU noticing.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

from keystore.errors import KeystoreError
from keystore.models import Disk
from keystore.services import snippets
from keystore.services.nbdproc import HostFiles

MAX_XML = 4 * 1024 * 1024
TARGETS = "abcdefghijklmnopqrstuvwxyz"


class DomainXmlError(KeystoreError):
    """The domain XML libvirt passed could not be read."""


@dataclasses.dataclass(frozen=True)
class DomainDisk:
    """An NBD-over-unix disk of the domain."""

    socket: Path
    readonly: bool
    export: str | None = None  #: the `name` of its `<source>`: the NBD export asked for


@dataclasses.dataclass(frozen=True)
class Domain:
    """The parts of a libvirt domain the hook acts on."""

    name: str
    uuid: str | None
    disks: tuple[DomainDisk, ...]
    redirdevs: tuple[Path, ...]  #: unix socket paths of `<redirdev type='unix'>`
    #: paths QEMU would open itself: `<source file=...>` / `<source dev=...>` of every disk
    #: (and of its `<backingStore>` chain)
    files: tuple[Path, ...] = ()


def parse_domain(data: bytes) -> Domain:
    """Read the domain XML libvirt writes on the hook's stdin."""
    if len(data) > MAX_XML:
        raise DomainXmlError(f"domain XML larger than {MAX_XML} bytes")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DomainXmlError(f"domain XML does not parse: {e}") from e
    if root.tag != "domain":
        raise DomainXmlError(f"expected a <domain> document, got <{root.tag}>")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise DomainXmlError("domain XML has no <name>")
    uuid = (root.findtext("uuid") or "").strip().lower() or None
    disks = []
    files = []
    for d in root.iterfind("devices/disk"):
        # the disk's own source, and those of its <backingStore> chain: after an external
        # snapshot the NBD export sits below a qcow2 overlay
        for src in d.iter("source"):
            files += [Path(src.get(a, "")) for a in ("file", "dev") if src.get(a)]
            host = src.find("host")
            if host is None or src.get("protocol") != "nbd":
                continue
            if host.get("transport") != "unix" or not host.get("socket"):
                continue
            disks.append(DomainDisk(Path(host.get("socket", "")), d.find("readonly") is not None,
                                    src.get("name") or None))  # fmt: skip
    redirs = []
    for r in root.iterfind("devices/redirdev"):
        rsrc = r.find("source")
        if r.get("type") == "unix" and rsrc is not None and rsrc.get("path"):
            redirs.append(Path(rsrc.get("path", "")))
    return Domain(name, uuid, tuple(disks), tuple(redirs), tuple(files))


# -- what `vmshield libvirt devices` prints ----------------------------------------------


def disk_socket(run_dir: Path, disk: str) -> Path:
    """The socket of disk `disk` served by an nbdkit of its own."""
    return run_dir / f"{disk}.sock"


def host_socket(run_dir: Path) -> Path:
    """The host disk server's NBD socket (every disk an export on it)."""
    return HostFiles(run_dir).socket


def usb_socket(run_dir: Path, vm: str, slot: int) -> Path:
    return run_dir / f"{vm}-usb{slot}.sock"


def usbgate_files(run_dir: Path, vm: str) -> tuple[Path, Path]:
    """The pid file and log file of VM's usbgate."""
    return run_dir / f"{vm}-usbgate.pid", run_dir / f"{vm}-usbgate.log"


def usbgate_state(run_dir: Path, vm: str) -> Path:
    """Where VM's usbgate publishes the devices attached now (`usbgate run --state`)."""
    return run_dir / f"{vm}-usbgate.state"


def _comment(text: str) -> str:
    """An XML comment that says `text`: "--" may not occur in one (a path holding "-->"
    would end it and put the rest of the path into the domain as elements)."""
    return f"<!-- {text.replace('--', '- -')} -->"


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def devices_xml(
    vm: str,
    disks: Sequence[Disk],
    run_dir: Path,
    *,
    usb_slots: int,
    redirfilter: str | None,
    readonly: bool = False,
    isolated: bool = False,
) -> str:
    """The `<devices>` children for VM: its disks over NBD (exports of the host disk server,
    or with `isolated` each on a socket of its own), then xhci, redirdevs, redirfilter."""
    if len(disks) > len(TARGETS):
        raise ValueError(f"VM {vm} has more than {len(TARGETS)} disks")
    parts = [f"<!-- vmshield: VM {vm}; served by the vmshield qemu hook -->"]
    for n, d in enumerate(disks):
        sock = str(disk_socket(run_dir, d.name) if isolated else host_socket(run_dir))
        parts.append(_comment(f"disk {d.name}: {d.path} (ciphertext, {d.format} {d.cipher})"))
        parts.append(snippets.libvirt_disk_xml(sock, target=f"vd{TARGETS[n]}", readonly=readonly,
                                               export=None if isolated else d.name))  # fmt: skip
    if usb_slots:
        parts.append('<controller type="usb" model="qemu-xhci"/>')
        for slot in range(usb_slots):
            path = quoteattr(str(usb_socket(run_dir, vm, slot)))
            parts += [
                '<redirdev bus="usb" type="unix">',
                f'  <source mode="bind" path={path}/>',
                "</redirdev>",
            ]
        if redirfilter:
            parts.append(redirfilter)
    return "\n".join(parts)


def indent_devices(text: str, prefix: str = "    ") -> str:
    """`devices_xml` indented to sit inside `<devices>` of a domain."""
    return _indent(text, prefix)
