"""`vmshield status`: what is running now (served disks, usbgates, unlocks, unattended disks)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from keystore import sizes
from keystore.auth import human_duration
from keystore.cli import abandoned
from keystore.cli.options import db_option, emit_json, handle_errors, json_option, table
from keystore.location import Location
from keystore.services import hookconf
from keystore.services import status as statusmod
from keystore.services.store import Keystore


def _bytes(n: int | None) -> str:
    return "-" if n is None else sizes.human(n)


def _devices(devices: list[dict[str, Any]] | None) -> str:
    """The attached devices, "0781:5567 (slot 0, from PEER)"; "-" when not published."""
    if devices is None:
        return "-"
    return ", ".join(f"{d.get('vid_pid')} (slot {d.get('slot')}, from {d.get('owner')})"
                     for d in devices) or "none"  # fmt: skip


def _when(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _mode(readonly: bool | None) -> str:
    return "?" if readonly is None else ("ro" if readonly else "rw")


@click.command("status")
@json_option
@db_option
@handle_errors
def status(as_json: bool, db: Location | None) -> None:
    """Show what is running: every served disk (VM, nbdkit pid, since, ro/rw, who started
    it, the clients connected now, the bytes they read and wrote, at most a second old),
    every usbgate with the devices attached through it, pending unlocks with their expiry,
    and the disks that start unattended (an enrolled host key).

    Read from the kernel, not only from the keystore: a disk served by a by-hand nbdkit
    or a systemd unit shows too. Clients and other users' processes are visible to root.
    Times are UTC.
    """
    abandoned.reap(db)
    st = statusmod.collect(Keystore(db), hookconf.run_dirs())
    if as_json:
        emit_json(st.to_json())
        return
    click.echo("served disks:")
    table(
        [
            [d.disk, d.vm, str(d.pid), _when(d.since), _mode(d.readonly), d.started_by,
             ", ".join(str(c) for c in d.clients) or "none", _bytes(d.read_bytes),
             _bytes(d.written_bytes), d.socket or "-"]
            for d in st.disks
        ],
        ["disk", "vm", "pid", "since (utc)", "mode", "started by", "clients", "read",
         "written", "socket"],
    )  # fmt: skip
    click.echo("\nusbgates:")
    table([[g.vm, str(g.pid), g.started_by, _devices(g.devices), g.command]
           for g in st.usbgates],
          ["vm", "pid", "started by", "attached", "command"])  # fmt: skip
    now = datetime.now(UTC)
    click.echo("\npending unlocks (`vmshield vm unlock`):")
    table(
        [
            [u.vm, _when(u.expires),
             "-" if u.expires is None else human_duration((u.expires - now).total_seconds())]
            for u in st.unlocks
        ],
        ["vm", "expires (utc)", "left"],
    )  # fmt: skip
    click.echo("\nunattended starts (host key, `vmshield disk enroll-host`):")
    table([[u.disk, u.vm, _when(u.since), u.host_key] for u in st.unattended],
          ["disk", "vm", "enrolled (utc)", "host key"])  # fmt: skip
