"""`vmshield vm unlock` and `vmshield disk enroll-host|unenroll-host`: starts without a person.

The qemu hook runs under libvirtd with no terminal. `vm unlock` (owner present) leaves the
owner's password in root's kernel keyring for a while; `disk enroll-host` (unattended) adds
a keyslot for a root-only host key. See docs/libvirt.md for what each protects against.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from keystore.cli.options import (
    SecretReader,
    actor,
    db_option,
    handle_errors,
    password_file_option,
    run,
    wipe,
)
from keystore.location import Location
from keystore.models import DiskState
from keystore.services import hookconf, unlock

F = TypeVar("F", bound=Callable[..., Any])


def host_key_option(f: F) -> F:
    return click.option(
        "--host-key",
        type=click.Path(dir_okay=False, path_type=Path),
        help="The host key file (default: host_key of the hook's configuration "
        f"${hookconf.CONFIG_ENV}, else {unlock.DEFAULT_HOST_KEY}).",
    )(f)


def _host_key_path(given: Path | None) -> Path:
    return given or hookconf.load_or_defaults().host_key


def _refuse_non_root(vm: str) -> None:
    """The unlock lives in the caller's kernel keyring; the hook reads root's."""
    uid = os.geteuid()
    if uid != 0:
        raise click.ClickException(
            f"vm unlock must run as root: the qemu hook runs as root under libvirtd and reads "
            f"root's kernel keyring, so as uid {uid} the password would wait in your own "
            f"keyring, where the hook never looks. Run `sudo vmshield vm unlock {vm}` (with the "
            "same --db), or have root enroll a host key for unattended starts "
            "(`sudo vmshield disk enroll-host DISK`)"
        )


@click.command("unlock")
@click.argument("vm_name", metavar="VM")
@click.option(
    "--for",
    "duration",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="How long the unlock waits for a start: 90s, 10m, 2h (at most 24h).",
)
@click.option("--cancel", is_flag=True, help="Withdraw a pending unlock instead.")
@password_file_option
@db_option
@handle_errors
def unlock_vm(
    vm_name: str, duration: str, cancel: bool, password_file: Path | None, db: Location | None
) -> None:  # fmt: skip
    """Let the next `virsh start VM` open its disks, within DURATION.

    Asks for the owner's password (verified and rate-limited by the keystore) and leaves
    it in root's kernel keyring with a timeout, where only root (the qemu hook under
    libvirtd) can read it. The hook takes it at the next start and removes it: one unlock,
    one start. After DURATION the kernel drops it and a start fails with "unlock VM first".
    """
    _refuse_non_root(vm_name)
    v = run(db, lambda r: r.get_vm(vm_name))
    if cancel:
        had = unlock.consume(v.uuid)
        run(db, lambda r: r.append_audit(actor(), "vm.unlock.cancel", v.name, {"pending": had}))
        click.echo(f"VM {v.name}: unlock withdrawn" if had else f"VM {v.name}: no pending unlock")
        return
    try:
        ttl = unlock.parse_duration(duration)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--for") from e
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens the disks of {v.name})")
    try:
        run(db, lambda r: r.authenticate(v.owner, bytes(pw), actor=actor(), vm=v.name))
        unlock.put(v.uuid, bytes(pw), ttl)
    finally:
        wipe(pw)
    run(db, lambda r: r.append_audit(actor(), "vm.unlock", v.name, {"seconds": ttl}))
    click.echo(f"VM {v.name} unlocked for {ttl} s: `virsh start {v.name}` within that time")


@click.command("enroll-host")
@click.argument("disk_name", metavar="DISK")
@host_key_option
@password_file_option
@db_option
@handle_errors
def enroll_host(
    disk_name: str, host_key: Path | None, password_file: Path | None, db: Location | None
) -> None:  # fmt: skip
    """Let this host open DISK unattended (the qemu hook, at every `virsh start`).

    Asks for the owner's password once and adds a keyslot whose passphrase is the host
    key, a random 256-bit key in a root-only file (created 0600 if absent). Whoever can
    read that file and the image reads the disk: a stolen image alone stays unreadable, a
    stolen host does not. Undo with `vmshield disk unenroll-host DISK`.
    """
    d = run(db, lambda r: r.get_disk(disk_name))
    if d.state is not DiskState.READY:
        raise click.ClickException(f"disk {d.name} is {d.state.value}, not ready")
    v = run(db, lambda r: r.get_vm(d.vm))
    path = _host_key_path(host_key)
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens {d.name})")
    try:
        run(db, lambda r: r.authenticate(v.owner, bytes(pw), actor=actor(), vm=v.name))
        key = unlock.ensure_host_key(path)
        try:
            slot = unlock.enroll_host(d.path, bytes(pw), bytes(key))
        finally:
            wipe(key)
    finally:
        wipe(pw)
    detail = {"disk": d.name, "keyslot": slot, "host_key": str(path)}
    run(db, lambda r: r.append_audit(actor(), "disk.enroll_host", d.vm, detail))
    click.echo(f"disk {d.name} enrolled on this host (keyslot {slot}, host key {path})")


@click.command("unenroll-host")
@click.argument("disk_name", metavar="DISK")
@host_key_option
@db_option
@handle_errors
def unenroll_host(disk_name: str, host_key: Path | None, db: Location | None) -> None:
    """Remove DISK's host-key keyslot: starts need `vmshield vm unlock` again.

    Needs no password: the host key itself opens the keyslot it removes. The owner's
    keyslot stays. The host key file is kept (other disks may use it).
    """
    d = run(db, lambda r: r.get_disk(disk_name))
    path = _host_key_path(host_key)
    key = unlock.read_host_key(path)
    if key is None:
        raise click.ClickException(f"no host key at {path}: disk {d.name} is not enrolled")
    try:
        slot = unlock.unenroll_host(d.path, bytes(key))
    finally:
        wipe(key)
    detail = {"disk": d.name, "keyslot": slot}
    run(db, lambda r: r.append_audit(actor(), "disk.unenroll_host", d.vm, detail))
    click.echo(f"disk {d.name} unenrolled: keyslot {slot} removed")
