"""Serving one encrypted disk: the keystore workflow around the nbdkit processes.

`prepare`, `serve_disk` and `stop_disk` check the disk, authenticate its owner, start its
server (keystore.services.nbdproc: one nbdkit per disk, `--isolated`), record the server and
the access (stopping the server again if it cannot be recorded), and the reverse.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path

from keystore import paths
from keystore.errors import Conflict, InUse, NotFound
from keystore.models import Disk, DiskState, Server, Vm
from keystore.services import lease, usage, verifier
from keystore.services.nbdproc import ServeError, ServerFiles, is_our_server, start, stop
from keystore.services.store import Keystore
from nbd_plugin.errors import VmshieldError
from nbd_plugin.serve.peers import Binding, parse_uuid


def vm_binding(vm: Vm) -> Binding:
    """Bind a server to `vm`: only a QEMU started with `-uuid` the VM's uuid may connect,
    and, inside a libvirt machine scope, only the one of the domain named after the VM (the
    hook starts a VM only as that domain)."""
    return Binding(parse_uuid(vm.uuid), vm.name)


# -- the keystore workflow ---------------------------------------------------------------


def prepare(
    store: Keystore, disk_name: str, socket: Path | None, *, readonly: bool = False
) -> tuple[Disk, Vm, ServerFiles]:
    """The disk, its VM and its server files, if the disk is ready and not already served
    (by vmshield, or read-write by a server started outside it: that one is named)."""
    d = store.run(lambda r: r.get_disk(disk_name))
    if d.state is not DiskState.READY:
        raise Conflict(f"disk {d.name} is {d.state.value}, not ready")
    v = store.run(lambda r: r.get_vm(d.vm))
    files = ServerFiles((socket or paths.default_run_dir() / f"{d.name}.sock").absolute())
    old = store.run(lambda r: r.get_server(d.name))
    if old is not None and is_our_server(old.pid, Path(old.socket)):
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
    return d, v, files


def serve_disk(
    store: Keystore,
    disk: Disk,
    vm: Vm,
    password: bytes,
    files: ServerFiles,
    *,
    readonly: bool,
    who: str,
    bind: Binding | None = None,
) -> int:
    """Authenticate the owner, start nbdkit, record the server and the access; its pid.

    The password counts toward the owner's lockout. A server that cannot be recorded is
    stopped again, so no server runs that `vmshield disk stop` does not know of.
    """
    # a verifier below this disk's keyslots is raised to them by this very check (B5)
    policy = verifier.covering_policy([disk.path])
    store.run(lambda r: r.authenticate(vm.owner, password, actor=who), policy=policy)
    return serve_recorded(store, disk, password, files, readonly=readonly, who=who, bind=bind)


def serve_recorded(
    store: Keystore,
    disk: Disk,
    passphrase: bytes,
    files: ServerFiles,
    *,
    readonly: bool,
    who: str,
    timeout: float = 60.0,
    keyslot: int | None = None,
    how: str | None = None,
    bind: Binding | None = None,
) -> int:
    """Start nbdkit with a passphrase already vouched for (the owner's verified password, the
    host key of an enrolled disk, a clevis token's: keystore.services.opening), take the
    lease, record the server and the access, and (with `how`) which way the disk was
    opened; its pid. `bind`: only that VM's QEMU may connect."""
    # a disk recorded before such names were refused must not take a VM's usbgate files
    paths.check_disk_name(disk.name)
    # on PostgreSQL, one read-write server per image cluster-wide (keystore/services/lease.py)
    held = lease.take(store.location, disk, files.socket, readonly=readonly)
    try:
        pid = start(
            Path(disk.path), passphrase, files, readonly=readonly, timeout=timeout,
            keyslot=keyslot, fence_fd=None if held is None else held.fence_fd, bind=bind,
        )  # fmt: skip
    except ServeError as e:
        if held is not None:
            held.abort()
        detail = {"disk": disk.name, "error": str(e)[-500:]}
        store.run(lambda r: r.append_audit(who, "disk.serve.failed", disk.vm, detail))
        raise
    if held is not None:
        held.attach(pid)
    try:
        store.run(
            lambda r: r.record_server(
                disk.name,
                socket=str(files.socket),
                pidfile=str(files.pidfile),
                pid=pid,
                readonly=readonly,
                actor=who,
            )
        )
        store.run(lambda r: r.record_access(disk.vm))
        if how is not None:
            opened = {"disk": disk.name, "how": how, "keyslot": keyslot}
            store.run(lambda r: r.append_audit(who, "disk.opened", disk.vm, opened))
    except VmshieldError:
        stop(pid, files)
        raise
    return pid


def held_by(disk: Disk) -> str:
    """`held by pid N: nbdkit -U ...` for each process locking the image, or ""."""
    return "; ".join(f"held by {p}" for p in usage.holders(disk.path))


def users(disk: Disk, sock: Path | None, run_dirs: Sequence[Path]) -> list[str]:
    """What is using the disk now: NBD clients on `sock`, a running libvirt domain that the
    qemu hook started the disk for (its record lives in one of `run_dirs`)."""
    found = [f"NBD client {c}" for c in usage.clients(sock)] if sock is not None else []
    for run_dir in dict.fromkeys(run_dirs):
        dom = usage.running_domain(run_dir, disk.vm)
        if dom is not None:
            found.append(f"libvirt domain {dom[0]} ({dom[1]}) started through the qemu hook")
            break
    return found


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
    """Stop the server of `disk_name` and forget it; (its record, whether it was running).

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
    files = ServerFiles(Path(s.socket))
    if not force and is_our_server(s.pid, files.socket):
        d = store.run(lambda r: r.get_disk(disk_name))
        refuse_in_use(d, f"vmshield disk stop {disk_name}", users(d, files.socket,
                      [files.socket.parent]))  # fmt: skip
    was_running = stop(s.pid, files)
    if was_running:
        _wait_released(store.run(lambda r: r.get_disk(disk_name)).path)
    store.run(lambda r: r.remove_server(disk_name, actor=who))
    return s, was_running


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
