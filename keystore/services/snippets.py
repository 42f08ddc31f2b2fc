"""What to give QEMU or libvirt to attach a served disk."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr


def nbd_uri(sock: str) -> str:
    return f"nbd+unix:///?socket={sock}"


def qemu_drive(sock: str, *, readonly: bool) -> str:
    """`-drive` arguments (the short form)."""
    ro = ",readonly=on" if readonly else ""
    return f"-drive file={nbd_uri(sock)},format=raw,if=virtio,cache=none{ro}"


def qemu_blockdev(sock: str, node: str, *, readonly: bool) -> str:
    """`-blockdev` + `-device` arguments (the modern form)."""
    ro = ",read-only=on" if readonly else ""
    return (
        f"-blockdev driver=nbd,node-name={node},server.type=unix,server.path={sock}{ro} "
        f"-device virtio-blk-pci,drive={node}"
    )


def libvirt_disk_xml(sock: str, *, target: str = "vda", readonly: bool) -> str:
    """A libvirt `<disk type='network'>` element for the domain XML."""
    lines = [
        '<disk type="network" device="disk">',
        '  <driver name="qemu" type="raw" cache="none"/>',
        '  <source protocol="nbd">',
        f'    <host transport="unix" socket={quoteattr(sock)}/>',
        "  </source>",
        f'  <target dev={quoteattr(target)} bus="virtio"/>',
    ]
    if readonly:
        lines.append("  <readonly/>")
    lines.append("</disk>")
    return "\n".join(lines)
