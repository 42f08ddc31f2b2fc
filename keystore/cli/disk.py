"""`vmshield disk ...`: encrypted disk images of VMs, and serving them to QEMU over NBD.

The erase developer's keystore/cli/destroy.py adds `disk destroy` (wired at the bottom).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import click

from keystore import paths
from keystore.cli.options import (
    PasswordSource,
    actor,
    db_option,
    emit_json,
    handle_errors,
    json_option,
    kdf_options,
    password_file_option,
    resolve_db,
    run,
    table,
    wipe,
)
from keystore.models import Disk, DiskState, Server
from keystore.repository import Repository
from keystore.services import disks as diskops
from keystore.services import serve, snippets

FORMATS = ("luks1", "luks2")


@click.group()
def disk() -> None:
    """Create encrypted disks and serve them to QEMU.

    A disk is a LUKS image file. Its keyslot passphrase is the owner's vmshield password:
    `disk serve` asks for it, the keystore verifies and rate-limits it, and the nbdkit
    server uses it to open the keyslot. QEMU only ever sees the plaintext through a unix
    socket; the file on the storage stays ciphertext.

    \b
    Typical use:
      vmshield disk create web1 --size 20G
      vmshield disk serve web1-0          # prints the QEMU and libvirt settings
      vmshield disk stop web1-0
    """


async def _next_name(r: Repository, vm: str) -> str:
    taken = {d.name for d in await r.list_disks()}
    v = await r.get_vm(vm)
    n = 0
    while f"{v.name}-{n}" in taken:
        n += 1
    return f"{v.name}-{n}"


@disk.command("create")
@click.argument("vm")
@click.option(
    "--size",
    required=True,
    metavar="SIZE",
    help="Plaintext size: bytes, or with K, M, G, T (binary units), e.g. 20G.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="luks2",
    show_default=True,
    help="Container format: luks2 (argon2id keyslot, 4096-byte sectors; --pbkdf-iterations "
    "makes it a PBKDF2 keyslot) or luks1 (also opens in QEMU and nbdkit's luks filter).",
)
@click.option(
    "--cipher",
    default="aes-xts-plain64",
    show_default=True,
    help="Cipher spec (aes-xts-plain64, aes-cbc-essiv:sha256, ...).",
)
@click.option(
    "--path",
    "image_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Image file to create (default: disks/NAME.img next to the keystore).",
)
@click.option("--name", help="Disk name (default: VM-N, e.g. web1-0).")
@kdf_options
@password_file_option
@db_option
def create(
    vm: str,
    size: str,
    fmt: str,
    cipher: str,
    image_path: Path | None,
    name: str | None,
    iter_time: int,
    pbkdf_iterations: int | None,
    password_file: Path | None,
    db: Path | None,
) -> None:
    """Create an encrypted disk for VM, with a keyslot for the VM owner's password.

    Asks for the owner's password (verified by the keystore; wrong passwords count toward
    the lockout). The image is written with mode 0600 and recorded as the disk NAME.
    """
    try:
        nbytes = diskops.parse_size(size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--size") from e
    v = run(db, lambda r: r.get_vm(vm))
    disk_name = name or run(db, lambda r: _next_name(r, vm))
    path = (image_path or paths.default_image_dir(resolve_db(db)) / f"{disk_name}.img").absolute()
    if path.exists():
        raise click.ClickException(f"{path} already exists; choose another --path")
    pw = PasswordSource(password_file).read(f"Password of {v.owner} (opens the disk)")
    try:
        run(db, lambda r: r.authenticate(v.owner, bytes(pw), actor=actor()))
        run(
            db,
            lambda r: r.add_disk(
                v.name, disk_name, str(path), fmt=fmt, cipher=cipher, size=nbytes, actor=actor()
            ),
        )
        try:
            diskops.create(
                path,
                nbytes,
                bytes(pw),
                fmt=fmt,
                cipher=cipher,
                iterations=pbkdf_iterations,
                iter_time_ms=iter_time,
            )
        except diskops.DiskOpError as e:
            error = {"error": str(e)}
            run(
                db,
                lambda r: r.set_disk_state(
                    disk_name, DiskState.FAILED, actor=actor(), detail=error
                ),
            )
            raise click.ClickException(str(e)) from e
        run(db, lambda r: r.set_disk_state(disk_name, DiskState.READY, actor=actor()))
    finally:
        wipe(pw)
    click.echo(f"disk {disk_name} created: {path} ({nbytes} bytes, {fmt}, {cipher})")
    click.echo(f"serve it with: vmshield disk serve {disk_name}")


def _server_files(d: Disk, socket: Path | None) -> serve.ServerFiles:
    return serve.ServerFiles((socket or paths.default_run_dir() / f"{d.name}.sock").absolute())


def _print_attach(d: Disk, sock: str, readonly: bool, as_json: bool, pid: int) -> None:
    node = f"vmshield-{d.name}".replace(".", "-")
    info = {
        "disk": d.name,
        "vm": d.vm,
        "pid": pid,
        "socket": sock,
        "uri": snippets.nbd_uri(sock),
        "readonly": readonly,
        "qemu_drive": snippets.qemu_drive(sock, readonly=readonly),
        "qemu_blockdev": snippets.qemu_blockdev(sock, node, readonly=readonly),
        "libvirt_xml": snippets.libvirt_disk_xml(sock, readonly=readonly),
    }
    if as_json:
        emit_json(info)
        return
    click.echo(f"serving disk {d.name} of VM {d.vm} on {sock} (nbdkit pid {pid})")
    click.echo(f"\nNBD URI:\n  {info['uri']}")
    click.echo(f"\nQEMU (short form):\n  {info['qemu_drive']}")
    click.echo(f"\nQEMU (-blockdev form):\n  {info['qemu_blockdev']}")
    click.echo(f"\nlibvirt <devices> entry:\n{info['libvirt_xml']}")
    click.echo(f"\nstop it with: vmshield disk stop {d.name}")


@disk.command("serve")
@click.argument("disk_name", metavar="DISK")
@click.option(
    "--socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to listen on (default: /run/vmshield/DISK.sock for root, "
    "$XDG_RUNTIME_DIR/vmshield/DISK.sock otherwise). At most 107 bytes.",
)
@click.option("--readonly", is_flag=True, help="Serve read-only (several readers may share).")
@password_file_option
@json_option
@db_option
@handle_errors
def serve_(
    disk_name: str,
    socket: Path | None,
    readonly: bool,
    password_file: Path | None,
    as_json: bool,
    db: Path | None,
) -> None:
    """Serve DISK's plaintext over NBD for QEMU; asks for the owner's password.

    Starts nbdkit in the background (it keeps running after this command returns),
    waits until the socket answers, records the server, counts an access on the VM, and
    prints the `-drive` / `-blockdev` arguments and the libvirt `<disk>` XML to use.
    The password reaches nbdkit through an inherited pipe: it is never in a command
    line, an environment or a file. Only the socket's owner can connect to it: whoever
    can connect reads the plaintext.
    """
    d = run(db, lambda r: r.get_disk(disk_name))
    if d.state is not DiskState.READY:
        raise click.ClickException(f"disk {d.name} is {d.state.value}, not ready")
    v = run(db, lambda r: r.get_vm(d.vm))
    files = _server_files(d, socket)
    old = run(db, lambda r: r.get_server(d.name))
    if old is not None and serve.is_our_server(old.pid, Path(old.socket)):
        raise click.ClickException(
            f"disk {d.name} is already served on {old.socket} "
            f"(pid {old.pid}); `vmshield disk stop {d.name}` first"
        )
    pw = PasswordSource(password_file).read(f"Password of {v.owner}")
    try:
        run(db, lambda r: r.authenticate(v.owner, bytes(pw), actor=actor()))
        try:
            pid = serve.start(Path(d.path), bytes(pw), files, readonly=readonly)
        except serve.ServeError as e:
            detail = {"disk": d.name, "error": str(e)[-500:]}
            run(db, lambda r: r.append_audit(actor(), "disk.serve.failed", d.vm, detail))
            raise
    finally:
        wipe(pw)
    sock = str(files.socket)
    try:
        run(
            db,
            lambda r: r.record_server(
                d.name,
                socket=sock,
                pidfile=str(files.pidfile),
                pid=pid,
                readonly=readonly,
                actor=actor(),
            ),
        )
        run(db, lambda r: r.record_access(d.vm))
    except click.ClickException:
        serve.stop(pid, files)
        raise
    _print_attach(d, sock, readonly, as_json, pid)


@disk.command("stop")
@click.argument("disk_name", metavar="DISK")
@db_option
def stop(disk_name: str, db: Path | None) -> None:
    """Stop the nbdkit server of DISK (shut QEMU's use of it down first)."""
    s = run(db, lambda r: r.get_server(disk_name))
    if s is None:
        raise click.ClickException(f"disk {disk_name} is not being served")
    was_running = serve.stop(s.pid, serve.ServerFiles(Path(s.socket)))
    run(db, lambda r: r.remove_server(disk_name, actor=actor()))
    click.echo(
        f"stopped server of {disk_name} (pid {s.pid})"
        if was_running
        else f"server of {disk_name} was not running; record removed"
    )


async def _listing(r: Repository, vm: str | None) -> list[tuple[Disk, Server | None]]:
    disks = await r.list_disks(vm)
    servers = {s.disk: s for s in await r.list_servers()}
    return [(d, servers.get(d.name)) for d in disks]


def _serving(s: Server | None) -> tuple[str, bool]:
    if s is None:
        return "-", False
    alive = serve.is_our_server(s.pid, Path(s.socket))
    return (s.socket if alive else f"stale (pid {s.pid} gone)"), alive


@disk.command("list")
@click.option("--vm", help="Only disks of this VM.")
@json_option
@db_option
def list_(vm: str | None, as_json: bool, db: Path | None) -> None:
    """List disks with their state, size and the socket they are served on."""
    rows = run(db, lambda r: _listing(r, vm))
    if as_json:
        out: list[dict[str, Any]] = []
        for d, s in rows:
            item = d.to_json()
            item["server"] = None if s is None else {**s.to_json(), "alive": _serving(s)[1]}
            out.append(item)
        emit_json(out)
        return
    table(
        [
            [d.name, d.vm, d.state.value, str(d.size), d.format, _serving(s)[0], d.path]
            for d, s in rows
        ],
        ["name", "vm", "state", "size", "format", "served on", "path"],
    )


@disk.command("forget")
@click.argument("disk_name", metavar="DISK")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@db_option
def forget(disk_name: str, yes: bool, db: Path | None) -> None:
    """Remove DISK's record without touching the image file.

    For images deleted or moved by other means. To destroy an image, use
    `vmshield disk destroy`.
    """
    if not yes:
        click.confirm(f"Forget disk {disk_name} (the file is kept)?", abort=True, err=True)
    d = run(db, lambda r: r.forget_disk(disk_name, actor=actor()))
    click.echo(f"disk {d.name} forgotten; {d.path} was not touched")


def _add_destroy() -> None:
    """`disk destroy` lives in keystore/cli/destroy.py (erase developer) once it exists."""
    if importlib.util.find_spec("keystore.cli.destroy") is None:
        return
    mod = importlib.import_module("keystore.cli.destroy")
    command = getattr(mod, "destroy", None)
    if isinstance(command, click.Command):
        disk.add_command(command, "destroy")


_add_destroy()

# `disk enroll-host|unenroll-host` (issue 15, libvirt): keystore/cli/unlock.py
from keystore.cli.unlock import enroll_host, unenroll_host  # noqa: E402

disk.add_command(enroll_host)
disk.add_command(unenroll_host)
