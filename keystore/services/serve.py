"""Serving one encrypted disk: the keystore workflow around the nbdkit processes.

`prepare`, `serve_disk` and `stop_disk` check the disk, authenticate its owner, serve it
(as an export of the host disk server, keystore.services.hostdisk; or, `--isolated`, from an
nbdkit of its own, keystore.services.nbdproc), record the server and the access (undoing the
serve if it cannot be recorded), and the reverse: remove the export or stop the server.
Both kinds are recorded alike (the `servers` table); `nbdproc.Endpoint` tells them apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path

from keystore import paths
from keystore.errors import Conflict, InUse, NotFound
from keystore.models import Disk, DiskState, Server, Vm
from keystore.services import hostdisk, hostlease, lease, nbdproc, usage, verifier
from keystore.services.nbdproc import (
    Endpoint,
    HostFiles,
    ServerFiles,
    is_our_server,
    start,
    stop,
)
from keystore.services.store import Keystore
from nbd_plugin.errors import VmshieldError
from nbd_plugin.osutil import statefile
from nbd_plugin.serve import control
from nbd_plugin.serve.peers import Binding, parse_uuid


def vm_binding(vm: Vm) -> Binding:
    """Bind a server to `vm`: only a QEMU started with `-uuid` the VM's uuid may connect,
    and, inside a libvirt machine scope, only the one of the domain named after the VM (the
    hook starts a VM only as that domain)."""
    return Binding(parse_uuid(vm.uuid), vm.name)


# -- the keystore workflow ---------------------------------------------------------------

#: where a disk is served: a per-disk nbdkit's files (`--isolated`), or the host server's
Target = ServerFiles | HostFiles


def alive(s: Server) -> bool:
    """Is the recorded server still serving its disk? (a per-disk nbdkit on its socket, or
    the host server with the disk's export)"""
    ep = Endpoint.parse(s.socket)
    if ep.export is None:
        return is_our_server(s.pid, ep.socket)
    files = HostFiles(ep.socket.parent)
    if not nbdproc.is_host_server(s.pid, files):
        return False
    found = hostdisk.exports(files)
    return found is not None and ep.export in found


def audit_host_events(store: Keystore) -> int:
    """Audit what the host servers of the recorded exports refused since last asked
    (hostdisk.audit_events); how many rows."""
    eps = [Endpoint.parse(s.socket) for s in store.run(lambda r: r.list_servers())]
    dirs = {ep.socket.parent for ep in eps if ep.export is not None}
    return sum(hostdisk.audit_events(store, HostFiles(d)) for d in sorted(dirs))


def clients(s: Server) -> list[usage.Process]:
    """The processes connected to the recorded server's disk (its socket, or its export)."""
    ep = Endpoint.parse(s.socket)
    if ep.export is None:
        return usage.clients(ep.socket)
    info = (hostdisk.exports(HostFiles(ep.socket.parent)) or {}).get(ep.export)
    pids = () if info is None else info.clients
    return [usage.process(p) or usage.Process(p, "(gone)") for p in pids]


def io_counts(s: Server) -> tuple[int | None, int | None]:
    """Bytes its clients read and wrote, as the recorded server counts them (at most a second
    old for a per-disk nbdkit's published file; a file another server left does not count)."""
    ep = Endpoint.parse(s.socket)
    if ep.export is not None:
        info = (hostdisk.exports(HostFiles(ep.socket.parent)) or {}).get(ep.export)
        return (None, None) if info is None else (info.bytes_read, info.bytes_written)
    return published_io(nbdproc.ServerFiles(ep.socket).statsfile, s.pid)


def published_io(statsfile: Path, pid: int | None) -> tuple[int | None, int | None]:
    """Bytes read and written that the per-disk nbdkit `pid` published (`stats=`; a file
    another server left, before this one wrote its first, does not count)."""
    state = statefile.read(statsfile)
    if state is None or state.get("pid") != pid:
        return None, None
    got = state.get("read_bytes"), state.get("written_bytes")
    return (got[0], got[1]) if all(isinstance(n, int) for n in got) else (None, None)


def prepare(
    store: Keystore,
    disk_name: str,
    socket: Path | None,
    *,
    readonly: bool = False,
    host: HostFiles | None = None,
) -> tuple[Disk, Vm, Target]:
    """The disk, its VM and where to serve it (`host`: as an export of the host server;
    else a server of its own on `socket`), if the disk is ready and not already served (by
    vmshield, or read-write by a server started outside it: that one is named)."""
    d = store.run(lambda r: r.get_disk(disk_name))
    if d.state is not DiskState.READY:
        raise Conflict(f"disk {d.name} is {d.state.value}, not ready")
    v = store.run(lambda r: r.get_vm(d.vm))
    target: Target
    if host is not None:
        hostdisk.export_name(d.name)
        target = host
    else:
        target = ServerFiles((socket or paths.default_run_dir() / f"{d.name}.sock").absolute())
    old = store.run(lambda r: r.get_server(d.name))
    if old is not None and alive(old):
        raise Conflict(
            f"disk {d.name} is already served on {old.socket} "
            f"(pid {old.pid}); `vmshield disk stop {d.name}` first"
        )
    held = "" if readonly else held_by(d)
    if held:
        raise InUse(
            f"disk {d.name} is served outside vmshield: its image is {held} "
            "(started by hand or by a systemd unit: stop that process first)"
        )
    return d, v, target


def serve_disk(
    store: Keystore,
    disk: Disk,
    vm: Vm,
    password: bytes,
    target: Target,
    *,
    readonly: bool,
    who: str,
    bind: Binding | None = None,
) -> int:
    """Authenticate the owner, serve the disk, record the server and the access; its pid.

    The password counts toward the owner's lockout. A server that cannot be recorded is
    stopped again, so no server runs that `vmshield disk stop` does not know of.
    """
    # a verifier below this disk's keyslots is raised to them by this very check (B5)
    policy = verifier.covering_policy([disk.path])
    store.run(lambda r: r.authenticate(vm.owner, password, actor=who, vm=vm.name), policy=policy)
    return serve_recorded(store, disk, password, target, readonly=readonly, who=who, bind=bind)


def serve_recorded(
    store: Keystore,
    disk: Disk,
    passphrase: bytes,
    target: Target,
    *,
    readonly: bool,
    who: str,
    timeout: float = 60.0,
    keyslot: int | None = None,
    how: str | None = None,
    bind: Binding | None = None,
) -> int:
    """Serve the disk with a passphrase already vouched for (the owner's verified password,
    the host key of an enrolled disk, a clevis token's: keystore.services.opening), take the
    lease, record the server and the access, and (with `how`) which way the disk was
    opened; the server's pid. `bind`: only that VM's QEMU may connect.

    `target` a HostFiles: the disk becomes an export of the host server (started if none
    runs), the add audited with what `restore` needs to add it again after a restart."""
    # a disk recorded before such names were refused must not take a VM's usbgate files
    paths.check_disk_name(disk.name)
    export = None
    # on PostgreSQL, one read-write server per image cluster-wide: a per-disk server's own
    # holder (keystore/services/lease.py), the host server's one (.../hostlease.py)
    held: lease.Lease | hostlease.HostLease | None = None
    if isinstance(target, HostFiles):
        export = hostdisk.export_name(disk.name)
        if store.location.shared:
            held = hostlease.take(store.location, disk, target, export, readonly=readonly)
    else:
        held = lease.take(store.location, disk, target.socket, readonly=readonly)
    try:
        if isinstance(target, HostFiles):
            assert export is not None
            pid, _ = hostdisk.ensure(target, timeout=timeout)
            hostdisk.add(target, export, disk.path, passphrase, readonly=readonly,
                         keyslot=keyslot, bind=bind, timeout=timeout,
                         fence_fd=None if held is None else held.fence_fd)  # fmt: skip
        else:
            pid = start(
                Path(disk.path), passphrase, target, readonly=readonly, timeout=timeout,
                keyslot=keyslot, fence_fd=None if held is None else held.fence_fd, bind=bind,
            )  # fmt: skip
    except VmshieldError as e:
        if held is not None:
            held.abort()
        detail = {"disk": disk.name, "error": str(e)[-500:]}
        store.run(lambda r: r.append_audit(who, "disk.serve.failed", disk.vm, detail))
        raise
    if held is not None:
        held.attach(pid)
    recorded = Endpoint(target.socket, export).recorded()
    try:
        store.run(
            lambda r: r.record_server(
                disk.name,
                socket=recorded,
                pidfile=str(target.pidfile),
                pid=pid,
                readonly=readonly,
                actor=who,
            )
        )
        store.run(lambda r: r.record_access(disk.vm))
        if how is not None:
            opened = {"disk": disk.name, "how": how, "keyslot": keyslot}
            store.run(lambda r: r.append_audit(who, "disk.opened", disk.vm, opened))
        if export is not None:
            added = {"disk": disk.name, "export": export, "uri": recorded, "pid": pid,
                     "readonly": readonly, "how": how, "keyslot": keyslot,
                     "bind": None if bind is None else {"uuid": bind.uuid,
                                                        "domain": bind.domain}}  # fmt: skip
            store.run(lambda r: r.append_audit(who, EXPORT_ADDED, disk.vm, added))
    except VmshieldError:
        if isinstance(target, HostFiles):
            assert export is not None
            with contextlib.suppress(VmshieldError):
                hostdisk.remove(target, export, force=True)
        else:
            stop(pid, target)
        raise
    return pid


#: the audit action of an export added to the host server (its detail is what restore reads)
EXPORT_ADDED = "disk.export.add"
EXPORT_REMOVED = "disk.export.remove"


def held_by(disk: Disk) -> str:
    """`held by pid N: nbdkit -U ...` for each process locking the image, or ""."""
    return "; ".join(f"held by {p}" for p in usage.holders(disk.path))


def users(disk: Disk, sock: Path | None, run_dirs: Sequence[Path]) -> list[str]:
    """What is using the disk now: NBD clients on `sock`, a running libvirt domain that the
    qemu hook started the disk for (its record lives in one of `run_dirs`)."""
    found = [f"NBD client {c}" for c in usage.clients(sock)] if sock is not None else []
    return found + _domains(disk, run_dirs)


def _domains(disk: Disk, run_dirs: Sequence[Path]) -> list[str]:
    for run_dir in dict.fromkeys(run_dirs):
        dom = usage.running_domain(run_dir, disk.vm)
        if dom is not None:
            return [f"libvirt domain {dom[0]} ({dom[1]}) started through the qemu hook"]
    return []


def refuse_in_use(disk: Disk, command: str, found: Sequence[str]) -> None:
    """InUse naming every user, as `cryptsetup close` says "still in use"."""
    if found:
        raise InUse(
            f"disk {disk.name} is still in use by {'; '.join(found)}: shut the guest down "
            f"(or disconnect the client) first, or run `{command} --force` to do it anyway"
        )


def stop_disk(
    store: Keystore, disk_name: str, *, who: str, force: bool = False
) -> tuple[Server, bool]:
    """Stop serving `disk_name` and forget its server; (its record, whether it was running).

    A per-disk server is stopped; a host server's export is removed (the server stays).
    Without `force`, refuses (InUse) while an NBD client is connected or the domain the
    hook started the disk for is running, naming them. A disk locked by a server vmshield
    did not start is named too (NotFound: there is nothing of ours to stop)."""
    s = store.run(lambda r: r.get_server(disk_name))
    if s is None:
        d = store.run(lambda r: r.get_disk(disk_name))
        held = held_by(d)
        raise NotFound(
            f"disk {disk_name} is not served by vmshield, but its image is {held} "
            "(started by hand or by a systemd unit: stop that process)"
            if held
            else f"disk {disk_name} is not being served"
        )
    ep = Endpoint.parse(s.socket)
    command = f"vmshield disk stop {disk_name}"
    if ep.export is not None:
        was_running = _remove_export(store, s, ep, command, force=force)
    else:
        files = ServerFiles(ep.socket)
        if not force and is_our_server(s.pid, files.socket):
            d = store.run(lambda r: r.get_disk(disk_name))
            refuse_in_use(d, command, users(d, files.socket, [files.socket.parent]))
        was_running = stop(s.pid, files)
    if was_running:
        _wait_released(store.run(lambda r: r.get_disk(disk_name)).path)
    store.run(lambda r: r.remove_server(disk_name, actor=who))
    if ep.export is not None:
        d = store.run(lambda r: r.get_disk(disk_name))
        gone = {"disk": d.name, "export": ep.export, "pid": s.pid, "was_served": was_running,
                "force": force}  # fmt: skip
        store.run(lambda r: r.append_audit(who, EXPORT_REMOVED, d.vm, gone))
    return s, was_running


def _remove_export(store: Keystore, s: Server, ep: Endpoint, command: str, *, force: bool) -> bool:
    """Remove the disk's export from the host server; False if it was not served."""
    assert ep.export is not None
    files = HostFiles(ep.socket.parent)
    if not nbdproc.is_host_server(s.pid, files):
        return False
    found = hostdisk.exports(files) or {}
    info = found.get(ep.export)
    if info is None:
        return False
    if not force:
        d = store.run(lambda r: r.get_disk(s.disk))
        refuse_in_use(d, command, hostdisk.clients(info) + _domains(d, [files.run_dir]))
    try:
        removed = hostdisk.remove(files, ep.export, force=force)
    except hostdisk.HostServerError as e:  # a client connected since we looked
        if e.code == control.Code.BUSY:
            raise InUse(f"{e}: or run `{command} --force` to do it anyway") from None
        raise
    if store.location.shared:  # now, not at the holder's next look
        hostlease.release(files, ep.export)
    return removed


def _wait_released(image: str, timeout: float = 5.0) -> None:
    """Until the stopped server's lock on `image` is gone (or `timeout`): the next command
    (destroy, serve) must not find it held by a server that is still exiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            os.close(fd)
