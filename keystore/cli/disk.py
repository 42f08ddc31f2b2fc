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
from keystore.services import (
    disk_import,
    hostdisk,
    opening,
    serve,
    snippets,
    unlock,
    usage,
)
from keystore.services import disks as diskops
from keystore.services import restore as restoremod
from keystore.services.nbdproc import Endpoint, HostFiles
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
    d: Disk,
    sock: str,
    readonly: bool,
    as_json: bool,
    pid: int,
    bound: Vm | None = None,
    export: str | None = None,
) -> None:
    node = f"vmshield-{d.name}".replace(".", "-")
    info = {
        "disk": d.name,
        "vm": d.vm,
        "pid": pid,
        "socket": sock,
        "export": export,
        "uri": snippets.nbd_uri(sock, export),
        "readonly": readonly,
        "qemu_drive": snippets.qemu_drive(sock, readonly=readonly, export=export),
        "qemu_blockdev": snippets.qemu_blockdev(sock, node, readonly=readonly, export=export),
        "libvirt_xml": snippets.libvirt_disk_xml(sock, readonly=readonly, export=export),
        "bound_to_vm": None if bound is None else bound.uuid,
    }
    if as_json:
        emit_json(info)
        return
    where = f"export {export} of the host server on {sock}" if export else sock
    click.echo(f"serving disk {d.name} of VM {d.vm} as {where} (nbdkit pid {pid})")
    if bound is not None:
        click.echo(f"bound: only a QEMU started with -uuid {bound.uuid} may connect")
    click.echo(f"\nNBD URI:\n  {info['uri']}")
    click.echo(f"\nQEMU (short form):\n  {info['qemu_drive']}")
    click.echo(f"\nQEMU (-blockdev form):\n  {info['qemu_blockdev']}")
    click.echo(f"\nlibvirt <devices> entry:\n{info['libvirt_xml']}")
    click.echo(f"\nstop it with: vmshield disk stop {d.name}")


def _host_files(run_dir: Path | None) -> HostFiles:
    return HostFiles((run_dir or paths.default_run_dir()).absolute())


@click.command("serve")
@click.argument("disk_name", metavar="DISK", required=False)
@click.option(
    "--isolated",
    is_flag=True,
    help="Serve DISK from an nbdkit of its own (its own socket, ~90 MiB) instead of as an "
    "export of the host disk server.",
)
@click.option(
    "--socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --isolated (implied): the unix socket to listen on (default: "
    "/run/vmshield/DISK.sock for root, $XDG_RUNTIME_DIR/vmshield/DISK.sock otherwise). "
    "At most 107 bytes.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The host disk server's directory (nbd.sock, nbd-control.sock; default: "
    "/run/vmshield for root, $XDG_RUNTIME_DIR/vmshield otherwise).",
)
@click.option("--readonly", is_flag=True, help="Serve read-only (several readers may share).")
@click.option(
    "--unattended",
    is_flag=True,
    help="Ask nobody: open DISK with a pending `vm unlock`, else a bound clevis token "
    "(`disk bind`), else the enrolled host key, in that order.",
)
@click.option(
    "--restore",
    is_flag=True,
    help="No DISK: after the host disk server restarted, serve again every export it "
    "served that a clevis token or the host key opened (or a pending `vm unlock`); name "
    "the others. Starts the server if none runs. Run by vmshield-nbd.service.",
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
    disk_name: str | None,
    isolated: bool,
    socket: Path | None,
    run_dir: Path | None,
    readonly: bool,
    unattended: bool,
    restore: bool,
    bind_vm: bool,
    host_key: Path | None,
    password_file: Path | None,
    as_json: bool,
    db: Path | None,
) -> None:
    """Serve DISK's plaintext over NBD for QEMU; asks for the owner's password.

    DISK becomes an export named DISK of the host disk server (one nbdkit for every disk of
    the host, started if none runs: vmshield-nbd.service under systemd); with --isolated,
    an nbdkit of its own. Waits until it answers, records the server, counts an access on
    the VM, and prints the `-drive` / `-blockdev` arguments and the libvirt `<disk>` XML to
    use. The password reaches the server through a pipe or the root-only control socket:
    it is never in a command line, an environment or a file. Whoever can connect to the
    socket reads the plaintext, unless --bind-vm.
    """
    store = Keystore(db)
    if restore:
        if disk_name or isolated or socket or readonly or unattended or bind_vm:
            raise click.UsageError("--restore takes no DISK and none of the serving options")
        _restore(store, _host_files(run_dir), host_key, as_json)
        return
    if not disk_name:
        raise click.UsageError("missing argument DISK (or give --restore)")
    if socket is not None and run_dir is not None:
        raise click.UsageError("--socket is a per-disk server's (--isolated), --run-dir the host's")
    host = None if isolated or socket is not None else _host_files(run_dir)
    # no host server yet (first use, or it died): the serve starts one, then the others are
    # restored; the owner's password is checked before anything starts
    restart = host is not None and hostdisk.ping(host) is None
    d, v, target = serve.prepare(store, disk_name, socket, readonly=readonly, host=host)
    if unattended:
        pid = _serve_unattended(store, d, v, target, readonly, host_key, bind_vm)
    else:
        pw = SecretReader(password_file).read(f"Password of {v.owner}")
        try:
            pid = serve.serve_disk(
                store, d, v, bytes(pw), target, readonly=readonly, who=actor(),
                bind=serve.vm_binding(v) if bind_vm else None,
            )  # fmt: skip
        finally:
            wipe(pw)
    export = d.name if host is not None else None
    if host is not None:
        if restart:
            _restored(store, host, host_key)
        hostdisk.audit_events(store, host)
    _print_attach(d, str(target.socket), readonly, as_json, pid, v if bind_vm else None, export)


def _restored(store: Keystore, host: HostFiles, key: Path | None) -> None:
    """This serve started the host server: what it served before comes back."""
    outcome = restoremod.restore(store, host, who=actor(), host_key=_host_key_path(key))
    for line in outcome.lines():
        click.echo(f"host disk server started: {line}", err=True)


def _restore(store: Keystore, host: HostFiles, key: Path | None, as_json: bool) -> None:
    outcome = restoremod.restore(store, host, who=actor(), host_key=_host_key_path(key))
    if as_json:
        emit_json(outcome.to_json())
    else:
        for line in outcome.lines() or ["nothing to restore"]:
            click.echo(line)
    if outcome.failed:
        raise SystemExit(1)


def _serve_unattended(
    store: Keystore,
    d: Disk,
    v: Vm,
    target: serve.Target,
    readonly: bool,
    key: Path | None,
    bind_vm: bool,
) -> int:
    owner_pw = unlock.peek(v.uuid)
    host = None if owner_pw is not None else unlock.read_host_key(_host_key_path(key))
    try:
        way = opening.open_disk(d, v, owner_pw, host)
        try:
            pid = serve.serve_recorded(store, d, bytes(way.secret), target, readonly=readonly,
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
    """Stop serving DISK: remove its export from the host disk server (the server keeps
    serving the other disks), or stop its own nbdkit (--isolated).

    Refused while a client (QEMU, qemu-io, nbdinfo...) is connected to it or the libvirt
    domain the qemu hook served it for is running: each is named (exit 75). Shut the guest
    down first, or give --force. Every removal is audited.
    """
    store = Keystore(db)
    serve.audit_host_events(store)
    s, was_running = serve.stop_disk(store, disk_name, who=actor(), force=force)
    what = "export" if Endpoint.parse(s.socket).export else "server"
    click.echo(
        f"stopped {what} of {disk_name} (pid {s.pid})"
        if was_running
        else f"{what} of {disk_name} was not running; record removed"
    )


async def _listing(r: Repository, vm: str | None) -> list[tuple[Disk, Server | None]]:
    disks = await r.list_disks(vm)
    servers = {s.disk: s for s in await r.list_servers()}
    return [(d, servers.get(d.name)) for d in disks]


def _serving(d: Disk, s: Server | None) -> tuple[str, bool]:
    if s is not None and serve.alive(s):
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
    serve.audit_host_events(Keystore(db))  # what the host server refused, before listing
    rows = run(db, lambda r: _listing(r, vm))
    if as_json:
        out: list[dict[str, Any]] = []
        for d, s in rows:
            item = d.to_json()
            alive = _serving(d, s)[1]
            item["server"] = (
                None
                if s is None
                else {**s.to_json(), "alive": alive, "export": Endpoint.parse(s.socket).export}
            )
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
