"""What to give QEMU or libvirt to attach a served disk.

`export`: the disk's NBD export on the host server's socket (None: a server of its own, whose
one export has the empty name). Every form carries a reconnect delay: if the server restarts
(the host server after a crash, `disk serve --restore`), QEMU's NBD client reconnects by
itself instead of failing the guest's I/O at once.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

#: seconds QEMU keeps retrying a lost NBD connection before failing the guest's requests
RECONNECT_DELAY = 10


def nbd_uri(sock: str, export: str | None = None) -> str:
    return f"nbd+unix:///{export or ''}?socket={sock}"


def qemu_drive(sock: str, *, readonly: bool, export: str | None = None) -> str:
    """`-drive` arguments (the short form; a URI carries no reconnect delay)."""
    ro = ",readonly=on" if readonly else ""
    return f"-drive file={nbd_uri(sock, export)},format=raw,if=virtio,cache=none{ro}"


def qemu_blockdev(sock: str, node: str, *, readonly: bool, export: str | None = None) -> str:
    """`-blockdev` + `-device` arguments (the modern form), with `reconnect-delay`."""
    ro = ",read-only=on" if readonly else ""
    name = f",export={export}" if export else ""
    return (
        f"-blockdev driver=nbd,node-name={node},server.type=unix,server.path={sock}{name},"
        f"reconnect-delay={RECONNECT_DELAY}{ro} -device virtio-blk-pci,drive={node}"
    )


def libvirt_disk_xml(
    sock: str, *, target: str = "vda", readonly: bool, export: str | None = None
) -> str:
    """A libvirt `<disk type='network'>` element for the domain XML (`<reconnect delay>`:
    libvirt 9.2 and later pass it to QEMU; older ones ignore it)."""
    name = f" name={quoteattr(export)}" if export else ""
    lines = [
        '<disk type="network" device="disk">',
        '  <driver name="qemu" type="raw" cache="none"/>',
        f'  <source protocol="nbd"{name}>',
        f'    <host transport="unix" socket={quoteattr(sock)}/>',
        f'    <reconnect delay="{RECONNECT_DELAY}"/>',
        "  </source>",
        f'  <target dev={quoteattr(target)} bus="virtio"/>',
    ]
    if readonly:
        lines.append("  <readonly/>")
    lines.append("</disk>")
    return "\n".join(lines)
