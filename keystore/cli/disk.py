"""`vmshield disk ...`: encrypted disk images of VMs, and serving them to QEMU over NBD.

The workflows live in keystore.services (disks, disk_import, serve, destroy, unattended);
this is the click layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from keystore import paths, sizes
from keystore.cli import abandoned
from keystore.cli.options import (
    SecretReader,
    actor,
    check_pbkdf2_iterations,
    cipher_option,
    confirm,
    db_option,
    done_event,
    emit_json,
    erase_reporter,
    format_option,
    json_errors,
    json_option,
    kdf_options,
    method_option,
    methods_help,
    password_file_option,
    resolve_db,
    run,
    summary,
    table,
    warn_if_unlocked,
    wipe,
)
from keystore.cli.progress import progress_option, reporter
from keystore.location import Location
from keystore.models import Disk, Server, Vm
from keystore.repository import Repository
from keystore.services import (
    binding,
    disk_import,
    hookconf,
    hostdisk,
    opening,
    serve,
    snippets,
    unattended,
    unlock,
    usage,
)
from keystore.services import destroy as destroying
from keystore.services import disks as diskops
from keystore.services import restore as restoremod
from keystore.services.nbdproc import Endpoint, HostFiles
from keystore.services.store import Keystore

F = TypeVar("F", bound=Callable[..., Any])


def host_key_option(f: F) -> F:
    return click.option(
        "--host-key",
        type=click.Path(dir_okay=False, path_type=Path),
        help="The host key file (default: host_key of the hook's configuration "
        f"${hookconf.CONFIG_ENV}, else {unlock.DEFAULT_HOST_KEY}).",
    )(f)


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
@progress_option
@db_option
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
    progress: bool | None,
    db: Location | None,
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
    abandoned.reap(db)  # a killed create of this name or path would be in the way
    v, disk_name = diskops.new_name(store, vm, name)  # refused before anything is said or made
    click.echo(f"size: {taken}", err=True)
    path = diskops.new_image_path(store, disk_name, image_path)
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
            progress=reporter(progress),
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
    db: Location | None,
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
    abandoned.reap(db)
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
    warn_if_unlocked()  # the restore reads the keyring, the host key, clevis tokens
    outcome = restoremod.restore(store, host, who=actor(), host_key=unattended.host_key_path(key))
    for line in outcome.lines():
        click.echo(f"host disk server started: {line}", err=True)


def _restore(store: Keystore, host: HostFiles, key: Path | None, as_json: bool) -> None:
    warn_if_unlocked()
    outcome = restoremod.restore(store, host, who=actor(), host_key=unattended.host_key_path(key))
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
    warn_if_unlocked()
    owner_pw = unlock.peek(v.uuid)
    host = None if owner_pw is not None else unlock.read_host_key(unattended.host_key_path(key))
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
def stop(disk_name: str, force: bool, db: Location | None) -> None:
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
def list_(vm: str | None, raw: bool, as_json: bool, db: Location | None) -> None:
    """List disks with their state, size and the socket they are served on (--json: sizes
    in bytes).

    A disk whose image a server vmshield did not start holds (nbdkit by hand, a systemd
    unit) shows as served outside vmshield, with that process's pid.
    """
    abandoned.reap(db)
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
def forget(disk_name: str, yes: bool, db: Location | None) -> None:
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
def import_(
    image: Path, vm_name: str, name: str | None, password_file: Path | None, db: Location | None
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
    v, disk_name = diskops.new_name(store, vm_name, name)
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


DESTROY_HELP = f"""Destroy the image of DISK and keep the record as destroyed.

\b
Checks the VM's erase permissions (vmshield perm show VM, thesis table 5-2):
  deep erase     needed by every overwriting method;
  normal delete  needed by --method crypto (keyslots wiped, file removed, the
                 undecryptable ciphertext is not overwritten).
A refusal is recorded in the audit trail. Then, as `vmshield image erase` does:
crypto-erase, overwrite passes, verification, discard, unlink, certificate. The
certificate's SHA-256 goes into the audit chain with the disk's new state.

\b
METHODS
{methods_help()}

\b
--background returns at once with a job id; `vmshield job status ID` follows it.
An interrupted destroy (state destroying or failed) continues where it stopped when
run again with the same method. A served disk is refused (the server is named):
`vmshield disk stop` first. So is a disk whose libvirt domain, started through the
qemu hook, still runs (--force erases anyway).

\b
Exit status: 0 destroyed (or job started); 1 error; 74 verification failed;
75 the image is in use; 77 the VM's permissions forbid this method.
"""


@click.command("destroy", help=DESTROY_HELP)
@click.argument("disk_name", metavar="DISK")
@method_option
@click.option("--background", is_flag=True, help="Run in a detached job; print its id.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Read the last pass back and compare.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines (progress, result) on stdout.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Erase even while the libvirt domain the qemu hook served DISK for still runs.",
)
@db_option
def destroy(
    disk_name: str,
    method: str,
    background: bool,
    verify: bool,
    as_json: bool,
    yes: bool,
    force: bool,
    db: Location | None,
) -> None:
    store = Keystore(db)
    abandoned.reap(db)
    disk = run(db, lambda r: destroying.claim(r, disk_name, method, actor()))
    destroying.check_not_served(disk)  # before asking; execute() checks again
    if not force:
        destroying.check_idle(disk, hookconf.run_dirs())
    confirm(f"disk {disk.name} ({disk.path})", yes)
    if background:
        job = destroying.spawn(Keystore(resolve_db(db)), disk, method, verify)
        if as_json:
            emit_json(job)
        else:
            click.echo(f"job {job['id']} started: vmshield job status {job['id']}")
        return

    from nbd_plugin.erase import EraseOptions

    erase = destroying.eraser(erase_reporter(as_json, method, verify))
    with json_errors(as_json):
        cert = destroying.execute(
            store, disk, method, EraseOptions(verify=verify), erase=erase, who=actor()
        )
    if as_json:
        done_event(cert, disk=disk.name)
    else:
        click.echo(summary(cert))


@contextlib.contextmanager
def _owner_password(
    store: Keystore, disk_name: str, password_file: Path | None
) -> Iterator[tuple[Disk, Vm, bytes]]:
    """Ready disk DISK, its VM and its owner's password (wiped when done), for the commands
    that add or remove a keyslot with it."""
    d = unattended.ready_disk(store, disk_name)
    v = store.run(lambda r: r.get_vm(d.vm))
    pw = SecretReader(password_file).read(f"Password of {v.owner} (opens {d.name})")
    try:
        yield d, v, bytes(pw)
    finally:
        wipe(pw)


@click.command("enroll-host")
@click.argument("disk_name", metavar="DISK")
@host_key_option
@password_file_option
@db_option
def enroll_host(
    disk_name: str, host_key: Path | None, password_file: Path | None, db: Location | None
) -> None:  # fmt: skip
    """Let this host open DISK unattended (the qemu hook, at every `virsh start`).

    Asks for the owner's password once and adds a keyslot whose passphrase is the host
    key, a random 256-bit key in a root-only file (created 0600 if absent). Whoever can
    read that file and the image reads the disk: a stolen image alone stays unreadable, a
    stolen host does not. Undo with `vmshield disk unenroll-host DISK`.
    """
    store = Keystore(db)
    path = unattended.host_key_path(host_key)
    with _owner_password(store, disk_name, password_file) as (d, v, pw):
        slot = unattended.enroll_host(store, d, v, pw, path, who=actor())
    click.echo(f"disk {d.name} enrolled on this host (keyslot {slot}, host key {path})")


@click.command("unenroll-host")
@click.argument("disk_name", metavar="DISK")
@host_key_option
@db_option
def unenroll_host(disk_name: str, host_key: Path | None, db: Location | None) -> None:
    """Remove DISK's host-key keyslot: starts need `vmshield vm unlock` again.

    Needs no password: the host key itself opens the keyslot it removes. The owner's
    keyslot stays. The host key file is kept (other disks may use it).
    """
    store = Keystore(db)
    d = run(db, lambda r: r.get_disk(disk_name))
    warn_if_unlocked()  # the host key opens the keyslot it removes
    slot = unattended.unenroll_host(store, d, unattended.host_key_path(host_key), who=actor())
    click.echo(f"disk {d.name} unenrolled: keyslot {slot} removed")


def _say_bound(detail: dict[str, Any], verb: str) -> None:
    click.echo(f"disk {detail['disk']}: keyslot {detail['keyslot']} {verb} to {detail['pins']}")
    for thp in detail["thumbprints"]:
        click.echo(f"  trusted Tang signing key {thp}")


@click.command("bind")
@click.argument("disk_name", metavar="DISK")
@click.argument("pin", type=click.Choice(["tang", "tpm2", "sss"]))
@click.option(
    "--url",
    "urls",
    multiple=True,
    help="A Tang server, e.g. http://tang.example:7500 (tang: one; sss: one per server).",
)
@click.option(
    "--thumbprint",
    help="tang: trust only the signing key with this thumbprint (`tang-show-keys` on the "
    "server). Without it the server's keys are trusted as they are now, and printed.",
)
@click.option("--pcr-ids", help="tpm2: seal to these PCRs too, e.g. 7 or 0,7.")
@click.option(
    "--threshold", type=click.IntRange(1, 16), help="sss: how many of the pins must answer."
)
@click.option("--tpm2", "with_tpm2", is_flag=True, help="sss: this host's TPM2 is one pin.")
@password_file_option
@json_option
@db_option
def bind(
    disk_name: str,
    pin: str,
    urls: tuple[str, ...],
    thumbprint: str | None,
    pcr_ids: str | None,
    threshold: int | None,
    with_tpm2: bool,
    password_file: Path | None,
    as_json: bool,
    db: Location | None,
) -> None:
    """Let DISK open unattended while its pins answer (network-bound unlock).

    PIN is tang (a Tang server: the disk opens only on the network that reaches it), tpm2
    (this host's TPM: the image opens on this machine only) or sss (THRESHOLD of several
    Tang servers and/or the TPM, e.g. 1 of 2 Tang servers so one down is no outage).

    Asks for the owner's password once and adds a keyslot with a random passphrase that only
    the pins can recover (a clevis token in the LUKS2 header, as `clevis luks bind` writes:
    `clevis luks list -d IMAGE` shows it). `disk serve --unattended` and the libvirt hook use
    it. Undo with `vmshield disk unbind DISK --slot N`.

    \b
      vmshield disk bind web-0 tang --url http://tang.example:7500
      vmshield disk bind web-0 tpm2 --pcr-ids 7
      vmshield disk bind web-0 sss --threshold 1 --url http://t1:7500 --url http://t2:7500
    """
    store = Keystore(db)
    config = binding.pin_config(
        pin, urls, thumbprint=thumbprint, pcr_ids=pcr_ids, threshold=threshold, tpm2=with_tpm2
    )
    with _owner_password(store, disk_name, password_file) as (d, v, pw):
        detail = unattended.bind(store, d, v, pw, pin, config, who=actor())
    if as_json:
        emit_json(detail)
        return
    _say_bound(detail, "bound")


@click.command("rebind")
@click.argument("disk_name", metavar="DISK")
@click.option("--slot", type=click.IntRange(0, 31), required=True, help="The bound keyslot.")
@click.option("--thumbprint", help="Trust only the Tang signing key with this thumbprint.")
@db_option
def rebind(disk_name: str, slot: int, thumbprint: str | None, db: Location | None) -> None:
    """Bind DISK's keyslot SLOT to its Tang server's current keys (after a key rotation).

    Like `clevis luks regen`: the passphrase is recovered with the old binding (the server
    keeps rotated keys until they are deleted) and encrypted to the keys the server now
    advertises; the keyslot stays. Run it for each bound disk before deleting the old keys.
    """
    store = Keystore(db)
    d = unattended.ready_disk(store, disk_name)
    warn_if_unlocked()  # the passphrase comes back from the old binding
    _say_bound(unattended.rebind(store, d, slot, thumbprint, who=actor()), "rebound")


@click.command("unbind")
@click.argument("disk_name", metavar="DISK")
@click.option("--slot", type=click.IntRange(0, 31), required=True, help="The bound keyslot.")
@password_file_option
@db_option
def unbind(disk_name: str, slot: int, password_file: Path | None, db: Location | None) -> None:
    """Remove DISK's clevis-bound keyslot SLOT and its token (the owner's password stays)."""
    store = Keystore(db)
    with _owner_password(store, disk_name, password_file) as (d, v, pw):
        pins = unattended.unbind(store, d, v, pw, slot, who=actor())
    click.echo(f"disk {d.name}: keyslot {slot} ({pins}) removed")
