"""Starting and stopping the nbdkit server that serves one encrypted disk as plaintext NBD.

`start` runs

    nbdkit -U SOCK -P PIDFILE --log=stderr [-r] python nbd_plugin/plugin.py \\
        image=PATH passphrase=-FD

with the passphrase written into a pipe whose read end (FD) nbdkit inherits: it never
appears in argv, the environment or a file. nbdkit forks into the background once the
plugin is configured (the keyslot is opened before the fork, so a wrong passphrase is a
non-zero exit here), writes PIDFILE and outlives this process. The server's stderr goes to
a log file next to the socket (mode 0600).

`prepare`, `serve_disk` and `stop_disk` are the keystore workflow around them: check the
disk, authenticate its owner, start, record the server and the access (stopping the server
again if it cannot be recorded), and the reverse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import shutil
import signal
import socket as socketmod
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from keystore import paths
from keystore.errors import Conflict, InUse, KeystoreError, NotFound
from keystore.models import Disk, DiskState, Server, Vm
from keystore.services import lease, usage, verifier
from keystore.services.store import Keystore
from nbd_plugin.errors import VmshieldError
from nbd_plugin.serve.peers import Binding, parse_uuid

NBD_MAGIC = b"NBDMAGIC"


def read_own(path: Path, limit: int) -> bytes:
    """The last `limit` bytes of a file only root or we can change (nbd_plugin.trust: never
    through a symlink); OSError (EPERM for an untrusted one) if it cannot be read."""
    from nbd_plugin import trust

    try:
        return trust.read_file(path, "file", limit, tail=True)
    except trust.Untrusted as e:
        raise PermissionError(errno.EPERM, str(e), str(path)) from None


class ServeError(KeystoreError):
    """nbdkit could not be started or did not answer; the message includes its log."""


def plugin_path() -> Path:
    """The nbdkit Python plugin file shipped in the nbd_plugin package."""
    import nbd_plugin

    return Path(nbd_plugin.__file__).parent / "plugin.py"


@dataclasses.dataclass(frozen=True)
class ServerFiles:
    """The socket of a server and the pid/log files kept beside it."""

    socket: Path

    @property
    def pidfile(self) -> Path:
        return self.socket.with_suffix(".pid")

    @property
    def logfile(self) -> Path:
        return self.socket.with_suffix(".log")

    @property
    def statsfile(self) -> Path:
        """The I/O counters the plugin publishes (`stats=`), read by `vmshield status`."""
        return self.socket.with_suffix(".stats")


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return read_own(path, limit).decode(errors="replace").strip()
    except OSError:
        return ""


def probe(sock: Path, timeout: float = 1.0) -> bool:
    """True if an NBD server answers on `sock` (reads the newstyle greeting)."""
    s = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock))
        data = b""
        while len(data) < len(NBD_MAGIC):
            chunk = s.recv(len(NBD_MAGIC) - len(data))
            if not chunk:
                return False
            data += chunk
        return data == NBD_MAGIC
    except OSError:
        return False
    finally:
        s.close()


def start(
    image: Path,
    passphrase: bytes,
    files: ServerFiles,
    *,
    readonly: bool,
    timeout: float = 60.0,
    nbdkit: str = "nbdkit",
    keyslot: int | None = None,
    fence_fd: int | None = None,
    bind: Binding | None = None,
) -> int:
    """Start nbdkit for `image` on `files.socket`; return its pid once the socket answers.

    `keyslot`: the passphrase is for that keyslot only (a clevis token's).
    `fence_fd`: the read end of the lease holder's pipe (nbd_plugin/serve/fence.py).
    `bind`: only that VM's QEMU may connect (nbd_plugin/serve/peers.py)."""
    exe = shutil.which(nbdkit)
    if exe is None:
        raise ServeError("nbdkit not found: install the nbdkit and nbdkit-plugin-python packages")
    sock = files.socket
    if len(os.fsencode(sock)) > 107:
        raise ServeError(f"socket path {sock} is longer than 107 bytes; choose a shorter --socket")
    if probe(sock):
        raise ServeError(f"something already serves on {sock}")
    paths.private_dir(sock.parent)
    for stale in (sock, files.pidfile, files.logfile, files.statsfile):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()  # in a directory only we can write: a planted symlink goes too
    log_fd = os.open(files.logfile, paths.NEW_FILE, 0o600)
    r, w = os.pipe()
    try:
        os.write(w, passphrase)  # far below the pipe's capacity: never blocks
        os.close(w)
        w = -1
        cmd = [exe, "-U", str(sock), "-P", str(files.pidfile), "--log=stderr"]
        if readonly:
            cmd.append("-r")
        cmd += ["python", str(plugin_path()), f"image={image}", f"passphrase=-{r}",
                f"stats={files.statsfile}"]  # fmt: skip
        if keyslot is not None:
            cmd.append(f"keyslot={keyslot}")
        if fence_fd is not None:
            cmd.append(f"fence=-{fence_fd}")
        if bind is not None:
            cmd.append(f"bind={bind.uuid}")
            if bind.domain is not None:
                cmd.append(f"bind_domain={bind.domain}")
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=(r,) if fence_fd is None else (r, fence_fd),
            start_new_session=True,
            umask=0o077,
            timeout=timeout,
            check=False,
            env=_clean_env(),
        )
    except subprocess.TimeoutExpired as e:
        raise ServeError(f"nbdkit did not start within {timeout:.0f} s") from e
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        os.close(log_fd)
    if proc.returncode != 0:
        raise ServeError(
            f"nbdkit failed to start (exit {proc.returncode}): "
            f"{_tail(files.logfile) or 'no output'}"
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = read_pid(files.pidfile)
        if pid and probe(sock):
            return pid
        time.sleep(0.05)
    raise ServeError(f"nbdkit started but {sock} does not answer: {_tail(files.logfile)}")


def vm_binding(vm: Vm) -> Binding:
    """Bind a server to `vm`: only a QEMU started with `-uuid` the VM's uuid may connect,
    and, inside a libvirt machine scope, only the one of the domain named after the VM (the
    hook starts a VM only as that domain)."""
    return Binding(parse_uuid(vm.uuid), vm.name)


def _clean_env() -> dict[str, str]:
    """The environment nbdkit gets: only what it needs (no secrets could leak through it)."""
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR", "HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    # the plugin imports nbd_plugin from this checkout or installation
    root = str(plugin_path().parent.parent)
    env["PYTHONPATH"] = root + (":" + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    return env


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(read_own(pidfile, 64).decode().strip())
    except (OSError, ValueError):
        return None


def is_our_server(pid: int, sock: Path) -> bool:
    """True if `pid` is alive and is an nbdkit listening on `sock` (not a recycled pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == b"nbdkit" and os.fsencode(sock) in argv


def _exited(pid: int) -> bool:
    """Has `pid` closed its files (gone, or a zombie)? Its command line empties when its memory
    is released, before its descriptors (and the image's locks) are: an exiting server no
    longer looks like ours while it still holds the image."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(")") + 2 :][:1] in ("Z", "X")


def stop(pid: int, files: ServerFiles, *, timeout: float = 10.0) -> bool:
    """SIGTERM the server if it is still ours; wait for it. False if it was not running."""
    running = is_our_server(pid, files.socket)
    if running:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_our_server(pid, files.socket) or not _exited(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    for f in (files.socket, files.pidfile):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    return running


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
    store.run(lambda r: r.authenticate(vm.owner, password, actor=who, vm=vm.name), policy=policy)
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
