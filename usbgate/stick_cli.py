"""`usbgate simulate-stick`: a simulated USB stick, backed by an image file, on usbredir.

It plays `usbredirect --device VID:PID --to ADDR` for a stick that does not exist: connects to
a gateway (or straight to QEMU's usb-redir chardev), announces a mass-storage device and serves
the guest's SCSI commands from IMAGE until the peer hangs up or the device is rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from usbgate.addresses import Address, parse_address
from usbgate.simulator import FakeOwner, MassStorageStick
from usbgate.storage.scsi import Op


def _hex16(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        number = int(value, 16)
    except ValueError:
        number = -1
    if not 0 <= number <= 0xFFFF or len(value) > 4:
        raise click.BadParameter(f"{value!r} is not a 4-digit hex id (e.g. 0781)")
    return number


def _addr(ctx: click.Context, param: click.Parameter, value: str) -> Address:
    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("simulate-stick")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--vid", default="0781", show_default=True, callback=_hex16,
              help="Vendor id the stick announces (hex).")  # fmt: skip
@click.option("--pid", default="5567", show_default=True, callback=_hex16,
              help="Product id the stick announces (hex).")  # fmt: skip
@click.option("--serial", default="4C530001", show_default=True,
              help="Serial number (string descriptor and SCSI unit serial).")  # fmt: skip
@click.option("--connect", "connect", required=True, callback=_addr, metavar="ADDR",
              help="Where to connect: the gateway's --listen (tcp:HOST:PORT or unix:PATH) "
              "or QEMU's usb-redir chardev directly.")  # fmt: skip
@click.option("--read-only", is_flag=True, help="Report the medium write-protected.")
def simulate_stick(image: Path, vid: int, pid: int, serial: str, connect: Address,
                   read_only: bool) -> None:  # fmt: skip
    """Offer a simulated USB mass-storage stick whose blocks are IMAGE.

    Try a gateway without USB hardware: the guest sees a real Bulk-Only mass-storage
    device (512-byte blocks, the image's size rounded down) and reads and writes IMAGE.
    Make IMAGE with e.g. `truncate -s 64M stick.img && mkfs.ext4 -d DIR stick.img`.
    A `filter_reject` (usbgate blocked it) leaves the stick plugged in: a later rule may
    allow it without a replug. Exits 0 when the peer closes the connection, 1 when it does
    so after a filter_reject (the stick was rejected or revoked).

    \b
    Example:
      usbgate simulate-stick stick.img --vid 0781 --pid 5567 --connect tcp:gw-host:4000
    """
    try:
        stick = MassStorageStick.from_image(str(image), vendor_id=vid, product_id=pid,
                                            serial=serial, read_only=read_only)  # fmt: skip
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise click.ClickException(f"cannot use {image} as a stick: {reason}") from exc
    try:
        rejected = asyncio.run(_offer(stick, connect))
    except OSError as exc:
        raise click.ClickException(f"cannot connect to {connect}: {exc.strerror or exc}") from exc
    except ConnectionError as exc:
        raise click.ClickException(f"{connect} closed the connection: {exc}") from exc
    finally:
        assert stick.transport is not None
        disk = stick.transport.disk
        click.echo(f"simulate-stick: SCSI commands served: {_command_counts(disk.commands)}",
                   err=True)  # fmt: skip
        close = getattr(disk.store, "close", None)
        if close is not None:
            close()
    if rejected:
        raise click.ClickException(f"{vid:04x}:{pid:04x} was rejected or revoked by {connect}")
    click.echo(f"simulate-stick: {connect} closed the connection", err=True)


def _command_counts(commands: dict[int, int]) -> str:
    """ "READ_10 x120, INQUIRY x1, unknown 0xa1 x1" (unknown ones got ILLEGAL REQUEST)."""
    names = {int(op): op.name for op in Op}
    parts = [f"{names.get(op, f'unknown {op:#04x}')} x{n}" for op, n in sorted(commands.items())]
    return ", ".join(parts) or "none"


async def _offer(stick: MassStorageStick, address: Address) -> bool:
    """Serve until the peer closes or we are interrupted; True if it was filter-rejected."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    owner = await FakeOwner.connect(str(address), stick)
    click.echo(f"simulate-stick: {stick.vendor_id:04x}:{stick.product_id:04x} offered to "
               f"{address}", err=True)  # fmt: skip
    waits = [asyncio.create_task(e.wait()) for e in (owner.closed, stop)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        with contextlib.suppress(Exception):
            await owner.close()
    return owner.filter_rejected.is_set()
