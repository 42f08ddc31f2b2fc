"""`vmshield disk ...`: encrypted disk images of VMs, and serving them to QEMU over NBD.

The workflows live in keystore.services (disks, serve, destroy); this is the click layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from keystore import paths, sizes
from keystore.cli.options import (
    SecretReader,
    actor,
    check_pbkdf2_iterations,
    cipher_option,
    db_option,
    emit_json,
    format_option,
    handle_errors,
    json_option,
    kdf_options,
    password_file_option,
    resolve_db,
    run,
    table,
    wipe,
)
from keystore.cli.unlock import _host_key_path, host_key_option
from keystore.models import Disk, Server, Vm
from keystore.repository import Repository
from keystore.services import disk_import, nbdproc, opening, serve, snippets, unlock, usage
from keystore.services import disks as diskops
from keystore.services.store import Keystore


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


@click.command("create")
@click.argument("vm")
@click.option(
    "--size",
    required=True,
    metavar="SIZE",
    help="Plaintext size as qemu-img reads it: bytes, or with a suffix K, M, G, T, P, E "
    "(powers of 1024), e.g. 20G or 1.5G; rounded up to whole sectors.",
)
@format_option()
@cipher_option
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
@handle_errors
def create(
    vm: str,
    size: str,
    fmt: str,
    cipher: str,
    image_path: Path | None,
    name: str | None,
    iter_time_ms: int,
    iterations: int | None,
    password_file: Path | None,
    db: Path | None,
) -> None:
    """Create an encrypted disk for VM, with a keyslot for the VM owner's password.

    Asks for the owner's password (verified by the keystore; wrong passwords count toward
    the lockout). The image is written with mode 0600 and recorded as the disk NAME.
    """
    check_pbkdf2_iterations(iterations)
    try:
        nbytes, taken = sizes.image_size(size, 512 if fmt == "luks1" else 4096)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--size") from e
    store = Keystore(db)
    v = run(db, lambda r: r.get_vm(vm))
    disk_name = name or run(db, lambda r: diskops.next_name(r, vm))
    paths.check_disk_name(disk_name)  # refused before anything is said or made
    click.echo(f"size: {taken}", err=True)
    path = (image_path or paths.default_image_dir(resolve_db(db)) / f"{disk_name}.img").absolute()
    if path.exists():
        raise click.ClickException(f"{path} already exists; choose another --path")
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens the disk)")
    try:
        diskops.create_disk(
            store,
            v,
            disk_name,
            path,
            nbytes,
            bytes(pw),
            fmt=fmt,
            cipher=cipher,
            iterations=iterations,
            iter_time_ms=iter_time_ms,
            who=actor(),
        )
    finally:
        wipe(pw)
    click.echo(
        f"disk {disk_name} created: {path} ({sizes.human(nbytes)} = {nbytes} bytes, {fmt}, "
        f"{cipher})"
    )
    click.echo(f"serve it with: vmshield disk serve {disk_name}")


def _print_attach(
    d: Disk, sock: str, readonly: bool, as_json: bool, pid: int, bound: Vm | None = None
) -> None:
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
        "bound_to_vm": None if bound is None else bound.uuid,
    }
    if as_json:
        emit_json(info)
        return
    click.echo(f"serving disk {d.name} of VM {d.vm} on {sock} (nbdkit pid {pid})")
    if bound is not None:
        click.echo(f"bound: only a QEMU started with -uuid {bound.uuid} may connect")
    click.echo(f"\nNBD URI:\n  {info['uri']}")
    click.echo(f"\nQEMU (short form):\n  {info['qemu_drive']}")
    click.echo(f"\nQEMU (-blockdev form):\n  {info['qemu_blockdev']}")
    click.echo(f"\nlibvirt <devices> entry:\n{info['libvirt_xml']}")
    click.echo(f"\nstop it with: vmshield disk stop {d.name}")


@click.command("serve")
@click.argument("disk_name", metavar="DISK")
@click.option(
    "--socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to listen on (default: /run/vmshield/DISK.sock for root, "
    "$XDG_RUNTIME_DIR/vmshield/DISK.sock otherwise). At most 107 bytes.",
)
@click.option("--readonly", is_flag=True, help="Serve read-only (several readers may share).")
@click.option(
    "--unattended",
    is_flag=True,
    help="Ask nobody: open DISK with a pending `vm unlock`, else a bound clevis token "
    "(`disk bind`), else the enrolled host key, in that order.",
)
@click.option(
    "--bind-vm",
    is_flag=True,
    help="Open connections of the VM's own QEMU only (started with -uuid the VM's uuid; "
    "under libvirt, the domain named after the VM): nbdinfo, nbdcopy or another VM's QEMU "
    "is refused. The libvirt hook always binds.",
)
@host_key_option
@password_file_option
@json_option
@db_option
@handle_errors
def serve_(
    disk_name: str,
    socket: Path | None,
    readonly: bool,
    unattended: bool,
    bind_vm: bool,
    host_key: Path | None,
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
    can connect reads the plaintext, unless --bind-vm.
    """
    store = Keystore(db)
    d, v, files = serve.prepare(store, disk_name, socket, readonly=readonly)
    if unattended:
        pid = _serve_unattended(store, d, v, files, readonly, host_key, bind_vm)
        _print_attach(d, str(files.socket), readonly, as_json, pid, v if bind_vm else None)
        return
    pw = SecretReader(password_file).read(f"Password of {v.owner}")
    try:
        pid = serve.serve_disk(
            store, d, v, bytes(pw), files, readonly=readonly, who=actor(),
            bind=serve.vm_binding(v) if bind_vm else None,
        )  # fmt: skip
    finally:
        wipe(pw)
    _print_attach(d, str(files.socket), readonly, as_json, pid, v if bind_vm else None)


def _serve_unattended(
    store: Keystore,
    d: Disk,
    v: Vm,
    files: nbdproc.ServerFiles,
    readonly: bool,
    key: Path | None,
    bind_vm: bool,
) -> int:
    owner_pw = unlock.peek(v.uuid)
    host = None if owner_pw is not None else unlock.read_host_key(_host_key_path(key))
    try:
        way = opening.open_disk(d, v, owner_pw, host)
        try:
            pid = serve.serve_recorded(store, d, bytes(way.secret), files, readonly=readonly,
                                       who=actor(), keyslot=way.keyslot, how=way.how,
                                       bind=serve.vm_binding(v) if bind_vm else None)  # fmt: skip
        finally:
            way.wipe()
    finally:
        wipe(owner_pw or bytearray())
        wipe(host or bytearray())
    if way.how == "unlock":
        unlock.consume(v.uuid)
    click.echo(f"disk {d.name} opened by {way.how}" + (f" ({way.pins})" if way.pins else ""),
               err=True)  # fmt: skip
    return pid


@click.command("stop")
@click.argument("disk_name", metavar="DISK")
@click.option(
    "--force",
    is_flag=True,
    help="Stop it even while an NBD client is connected or its libvirt domain runs "
    "(the guest loses its disk).",
)
@db_option
@handle_errors
def stop(disk_name: str, force: bool, db: Path | None) -> None:
    """Stop the nbdkit server of DISK.

    Refused while a client (QEMU, qemu-io, nbdinfo...) is connected to its socket or the
    libvirt domain the qemu hook served it for is running: each is named (exit 75). Shut
    the guest down first, or give --force.
    """
    s, was_running = serve.stop_disk(Keystore(db), disk_name, who=actor(), force=force)
    click.echo(
        f"stopped server of {disk_name} (pid {s.pid})"
        if was_running
        else f"server of {disk_name} was not running; record removed"
    )


async def _listing(r: Repository, vm: str | None) -> list[tuple[Disk, Server | None]]:
    disks = await r.list_disks(vm)
    servers = {s.disk: s for s in await r.list_servers()}
    return [(d, servers.get(d.name)) for d in disks]


def _serving(d: Disk, s: Server | None) -> tuple[str, bool]:
    if s is not None and nbdproc.is_our_server(s.pid, Path(s.socket)):
        return s.socket, True
    outside = usage.holders(d.path)
    if outside:
        return f"outside vmshield (pid {', '.join(str(p.pid) for p in outside)})", False
    return ("-" if s is None else f"stale (pid {s.pid} gone)"), False


@click.command("list")
@click.option("--vm", help="Only disks of this VM.")
@click.option("--bytes", "raw", is_flag=True, help="Sizes in bytes (default: 20 GiB, 1.5 GiB).")
@json_option
@db_option
def list_(vm: str | None, raw: bool, as_json: bool, db: Path | None) -> None:
    """List disks with their state, size and the socket they are served on (--json: sizes
    in bytes).

    A disk whose image a server vmshield did not start holds (nbdkit by hand, a systemd
    unit) shows as served outside vmshield, with that process's pid.
    """
    rows = run(db, lambda r: _listing(r, vm))
    if as_json:
        out: list[dict[str, Any]] = []
        for d, s in rows:
            item = d.to_json()
            alive = _serving(d, s)[1]
            item["server"] = None if s is None else {**s.to_json(), "alive": alive}
            # a server vmshield did not start (by hand, a systemd unit) holding the image
            item["outside"] = [] if alive else [p.to_json() for p in usage.holders(d.path)]
            out.append(item)
        emit_json(out)
        return
    table(
        [
            [
                d.name,
                d.vm,
                d.state.value,
                str(d.size) if raw else sizes.human(d.size),
                d.format,
                _serving(d, s)[0],
                d.path,
            ]
            for d, s in rows
        ],
        ["name", "vm", "state", "size", "format", "served on", "path"],
    )


@click.command("forget")
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


@click.command("import")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--vm", "vm_name", required=True, help="VM the disk belongs to (see `vmshield vm add`)."
)
@click.option("--name", help="Disk name (default: VM-N, e.g. web1-0).")
@password_file_option
@db_option
@handle_errors
def import_(
    image: Path, vm_name: str, name: str | None, password_file: Path | None, db: Path | None
) -> None:
    """Register an existing LUKS image IMAGE as a disk of VM, e.g. after the keystore was
    lost, or for an image made with cryptsetup.

    IMAGE must be LUKS1 or LUKS2, not recorded already (as itself or as a copy of the same
    LUKS volume) and not held by a server. Asks for the password of VM's owner: the keystore
    verifies it (failures count toward the lockout) and a keyslot of IMAGE must open with
    it. Nothing is written to IMAGE; the disk is recorded with its format, cipher, size and
    identity, as `disk create` records it, and the import is audited.
    """
    store = Keystore(db)
    found = disk_import.inspect(image)
    v = run(db, lambda r: r.get_vm(vm_name))
    disk_name = name or run(db, lambda r: diskops.next_name(r, vm_name))
    paths.check_disk_name(disk_name)
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens the disk)")
    try:
        d = disk_import.import_disk(store, v, disk_name, found, bytes(pw), who=actor())
    finally:
        wipe(pw)
    click.echo(
        f"disk {d.name} imported: {d.path} ({sizes.human(d.size)} = {d.size} bytes, "
        f"{d.format}, {d.cipher})"
    )
    click.echo(f"serve it with: vmshield disk serve {d.name}")
