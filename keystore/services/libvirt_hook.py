"""The vmshield qemu hook: libvirt starts and stops a VM's disk servers and usbgate through it.

libvirt runs /etc/libvirt/hooks/qemu.d/vmshield as `vmshield NAME OP SUBOP EXTRA` with the
domain XML on stdin (the thin script `vmshield libvirt install-hook` writes calls `run`, which
hardens the process and calls `main`):

- `prepare begin`: find the VM in the keystore (domain uuid = VM uuid, else the name), serve
  each of its disks that the XML references under the run directory: as an export of the
  host disk server (RUN/nbd.sock, `<source name='DISK'>`; the server is started if none runs,
  and then what it served before is restored: keystore.services.restore) or from a server of
  its own (RUN/DISK.sock); start its usbgate if the XML has vmshield usb-redir slots, and
  wait until they answer. Any failure: stop (remove) what was started, print one line, exit
  1: libvirt aborts the start and shows it.
  Each server is bound to the domain (`domain_binding`): it opens connections of that
  domain's QEMU only, so a hotplug (no hook runs) or an alias of the socket path (the hook
  does not see it as vmshield's) reaches nothing.
- `release end`: stop them. `reconnect begin` (libvirtd restarted): check they are still
  there and say so. `migrate begin`: refused (one host serves an image read-write).

Disk passphrases come, in this order, from an unlock in the kernel keyring (`vmshield vm
unlock`), a clevis token whose Tang server or TPM answers (`vmshield disk bind`), or a host
key keyslot (`vmshield disk enroll-host`); see keystore.services.opening. The hook never
calls back into libvirt (that would deadlock the daemon). Every action is audited with actor
"libvirt-hook". Domains that use nothing of vmshield pass through untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from keystore import paths
from keystore.errors import KeystoreError, NotFound
from keystore.models import Disk, DiskState, Server, Vm
from keystore.repository import Repository
from keystore.services import hookconf, hostdisk, nbdproc, opening, serve, unlock, usbhost
from keystore.services import restore as restoremod
from keystore.services.hookconf import HookConfig
from keystore.services.libvirt_xml import (
    Domain,
    parse_domain,
    usb_socket,
    usbgate_files,
    usbgate_state,
)
from keystore.services.nbdproc import Endpoint, HostFiles
from keystore.services.serve import Target
from keystore.services.store import Keystore
from nbd_plugin.errors import VmshieldError
from nbd_plugin.serve.peers import Binding, parse_uuid

ACTOR = "libvirt-hook"


class HookError(KeystoreError):
    """The hook refuses or failed; the message is the one line libvirt shows."""


# -- finding what the domain asks for -----------------------------------------------------


def _resolved(path: Path) -> Path:
    """`path` with every symlink, "." and ".." resolved: the file QEMU will connect to."""
    return Path(os.path.realpath(path))


def _under(path: Path, directory: Path) -> bool:
    """Is `path` in `directory`, by whatever name (`/var/run/...`, `..`, a symlinked
    directory: #20 B2)?"""
    return _resolved(path).parent == _resolved(directory)


async def find_vm(repo: Repository, dom: Domain) -> Vm | None:
    """The keystore VM of the domain: by uuid (the VM's uuid is the domain's), else by name.

    Which domain may *start* it is `check_bound`'s question."""
    if dom.uuid:
        for v in await repo.list_vms():
            if v.uuid.lower() == dom.uuid:
                return v
    try:
        return await repo.get_vm(dom.name)
    except NotFound:
        return None


def _same_file(a: Path, b: str) -> bool:
    """Do `a` and `b` name the same file (one inode), whatever path reaches it?"""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


async def _refuse_images_as_files(repo: Repository, dom: Domain) -> None:
    """HookError (audited against the disk's VM) if the domain names a vmshield image as a
    file or block device: QEMU would open the ciphertext itself, beside or instead of the
    server (the server's QEMU-style locks stop it only while it serves)."""
    for d in await repo.list_disks():
        for f in dom.files:
            if _same_file(f, d.path):
                detail = {"domain": dom.name, "file": str(f), "disk": d.name,
                          "error": "vmshield image named as a file"}  # fmt: skip
                await repo.append_audit(ACTOR, "libvirt.prepare.refused", d.vm, detail)
                raise HookError(
                    f"domain {dom.name} names {f}, the ciphertext of vmshield disk {d.name}, "
                    "as a file: QEMU would open it beside the server; use its NBD socket "
                    "(`vmshield libvirt devices`)"
                )


def check_bound(vm: Vm, dom: Domain) -> None:
    """Each VM starts only as the domain named after it: a domain of another name that
    carries the VM's uuid (libvirt lets any name have any uuid not defined on this host)
    would get the VM's disks and use up its unlock."""
    if dom.name != vm.name:
        raise HookError(
            f"domain {dom.name} carries the uuid of VM {vm.name} but not its name: a VM's "
            f"disks go only to the domain named {vm.name} (rename the domain, or give it a "
            "uuid of its own)"
        )


def domain_binding(vm: Vm, dom: Domain) -> Binding:
    """The servers the hook starts open only this domain's QEMU (#20 B2/B3): libvirt runs no
    hook on hotplug nor for a socket named through an alias, so the server itself refuses
    every other client. QEMU carries the domain's uuid (`-uuid`), and libvirt puts it in
    the domain's machine scope (nbd_plugin/serve/peers.py)."""
    return Binding(parse_uuid(dom.uuid or vm.uuid), dom.name)


def uses_vmshield(dom: Domain, cfg: HookConfig) -> bool:
    paths = [d.socket for d in dom.disks] + list(dom.redirdevs)
    return any(_under(p, cfg.run_dir) for p in paths)


def wanted_disks(
    dom: Domain, disks: Sequence[Disk], cfg: HookConfig, vm: str
) -> list[tuple[Disk, Target]]:
    """The VM's disks the XML references, each with where to serve it: an export of the host
    disk server (RUN/nbd.sock, `<source name='DISK'>`) or a socket of its own (RUN/DISK.sock).
    Refuses sockets and exports of other disks."""
    by_socket = {f"{d.name}.sock": d for d in disks}
    by_name = {d.name: d for d in disks}
    host = HostFiles(cfg.run_dir)
    out: list[tuple[Disk, Target]] = []
    for dd in dom.disks:
        if not _under(dd.socket, cfg.run_dir):
            continue
        target: Target
        if _resolved(dd.socket).name == host.socket.name:
            d = by_name.get(dd.export or "")
            if d is None:
                raise HookError(
                    f"domain {dom.name} asks the host disk server {dd.socket} for export "
                    f"{dd.export or '(no name)'}, which is not a disk of VM {vm}"
                )
            target = host
        else:
            d = by_socket.get(_resolved(dd.socket).name)
            if d is None:
                raise HookError(
                    f"domain {dom.name} uses {dd.socket}, which is not a disk of VM {vm}"
                )
            target = nbdproc.ServerFiles(cfg.run_dir / f"{d.name}.sock")
        if dd.readonly:
            raise HookError(f"disk {d.name}: <readonly/> is not supported by the hook yet")
        out.append((d, target))
    return out


def wanted_usb_slots(dom: Domain, cfg: HookConfig, vm: str) -> list[Path]:
    mine = [_resolved(p) for p in dom.redirdevs if _under(p, cfg.run_dir)]
    expected = [usb_socket(cfg.run_dir, vm, n) for n in range(len(mine))]
    if mine != [_resolved(p) for p in expected]:
        raise HookError(
            f"domain {dom.name}: usb-redir sockets must be {', '.join(map(str, expected))} "
            "(print them with `vmshield libvirt devices`)"
        )
    return expected


# -- usbgate ------------------------------------------------------------------------------


def _usbgate_exe() -> str:
    here = Path(sys.executable).parent / "usbgate"
    found = str(here) if here.exists() else shutil.which("usbgate")
    if found is None:
        raise HookError("usbgate not found next to the hook's Python or on PATH")
    return found


def _usb_host(cfg: HookConfig, request: dict[str, Any]) -> dict[str, Any]:
    """One request to the `usbgate host serve` of hook.conf's usb_host; HookError if refused."""
    try:
        return usbhost.request(cfg.usb_host, request, timeout=cfg.timeout)
    except usbhost.UsbHostError as e:
        raise HookError(f"usbgate host {cfg.usb_host}: {e}") from e


def usbgate_pid(cfg: HookConfig, vm: str) -> int | None:
    """The pid of VM's usbgate if it is running (checked against /proc, not only the file);
    with usb_host, the host's pid if it serves VM."""
    if cfg.usb_host:
        try:
            reply = _usb_host(cfg, {"op": "list"})
        except HookError:
            return None
        return int(reply["pid"]) if any(v["vm"] == vm for v in reply["vms"]) else None
    pidfile, _ = usbgate_files(cfg.run_dir, vm)
    pid = nbdproc.read_pid(pidfile)
    if pid is None:
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    is_ours = any(os.path.basename(a) == b"usbgate" for a in argv[:2]) and vm.encode() in argv
    return pid if is_ours else None


def start_usbgate(cfg: HookConfig, vm: str, slots: Sequence[Path]) -> int:
    """Start VM's usbgate in the background; return its pid once it listens for owners.
    With usb_host, add VM to that running host instead (its pid)."""
    if cfg.usb_host:
        request = {"op": "add", "vm": vm, "listen": cfg.usb_listen_for(vm),
                   "qemu": [f"unix:{s}" for s in slots]}  # fmt: skip
        return int(_usb_host(cfg, request)["pid"])
    if usbgate_pid(cfg, vm) is not None:
        raise HookError(f"usbgate of VM {vm} is already running")
    pidfile, logfile = usbgate_files(cfg.run_dir, vm)
    paths.private_dir(cfg.run_dir)  # as for the disks: no one else may plant files there
    state = usbgate_state(cfg.run_dir, vm)
    for stale in (pidfile, logfile, state):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    argv = [_usbgate_exe(), "run", "--vm", vm, "--listen", cfg.usb_listen_for(vm), "--db",
            str(cfg.db), "--state", str(state)] + [
                a for s in slots for a in ("--qemu", f"unix:{s}")]  # fmt: skip
    log_fd = os.open(logfile, paths.NEW_FILE, 0o600)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
        )  # fmt: skip
    finally:
        os.close(log_fd)
    pid_fd = os.open(pidfile, paths.NEW_FILE, 0o600)
    with os.fdopen(pid_fd, "w") as f:
        f.write(f"{proc.pid}\n")
    deadline = time.monotonic() + cfg.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pidfile.unlink(missing_ok=True)
            said = logfile.read_text(errors="replace").strip().splitlines()
            raise HookError(f"usbgate of VM {vm} exited: {said[-1] if said else 'no output'}")
        if "listening on" in logfile.read_text(errors="replace"):
            return proc.pid
        time.sleep(0.02)
    stop_usbgate(cfg, vm)
    raise HookError(f"usbgate of VM {vm} did not listen within {cfg.timeout:.0f} s")


def stop_usbgate(cfg: HookConfig, vm: str, timeout: float = 10.0) -> bool:
    """SIGTERM VM's usbgate and wait; False if it was not running. With usb_host, remove VM
    from that host (which closes its listening socket)."""
    if cfg.usb_host:
        try:
            _usb_host(cfg, {"op": "remove", "vm": vm})
        except HookError:
            return False  # not served there (or no host to serve it)
        return True
    pid = usbgate_pid(cfg, vm)
    pidfile, _ = usbgate_files(cfg.run_dir, vm)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while usbgate_pid(cfg, vm) == pid:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    pidfile.unlink(missing_ok=True)
    listen = cfg.usb_listen_for(vm)
    if listen.startswith("unix:") and _under(Path(listen[5:]), cfg.run_dir):
        Path(listen[5:]).unlink(missing_ok=True)  # usbgate leaves its listening socket
    return pid is not None


# -- which domain started them ------------------------------------------------------------
# libvirt runs `release end` after a failed start too: a second domain that maps to the same
# VM (one by name, the other by uuid) fails its prepare ("already served") and would then stop
# the servers under the running guest. Prepare records the domain; release acts only for it.


def _identity(dom: Domain) -> str:
    return f"{dom.uuid or '-'} {dom.name}\n"


def _starter_file(cfg: HookConfig, vm: str) -> Path:
    return cfg.run_dir / f"{vm}.domain"


def _record_starter(cfg: HookConfig, vm: str, dom: Domain) -> None:
    path = _starter_file(cfg, vm)
    paths.private_dir(cfg.run_dir)
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, paths.NEW_FILE, 0o600), "w") as f:
        f.write(_identity(dom))


def _started_by(cfg: HookConfig, vm: str, dom: Domain) -> bool:
    try:
        return nbdproc.read_own(_starter_file(cfg, vm), 4096).decode() == _identity(dom)
    except (OSError, UnicodeDecodeError):
        return False


# -- the operations -----------------------------------------------------------------------


def _server(store: Keystore, disk: str) -> Server | None:
    return store.run(lambda r: r.get_server(disk))


def prepare(store: Keystore, cfg: HookConfig, vm: Vm, dom: Domain) -> str:
    began = time.monotonic()
    disks = wanted_disks(dom, store.run(lambda r: r.list_disks(vm.name)), cfg, vm.name)
    slots = wanted_usb_slots(dom, cfg, vm.name)
    for d, _ in disks:
        if d.state is not DiskState.READY:
            raise HookError(f"disk {d.name} is {d.state.value}, not ready")
        old = _server(store, d.name)
        if old is not None and serve.alive(old):
            raise HookError(f"disk {d.name} is already served (pid {old.pid}): stop it first")
    host = HostFiles(cfg.run_dir)
    # the hook starts the host server: what it served before (it died) comes back after
    restart = any(isinstance(t, HostFiles) for _, t in disks) and hostdisk.ping(host) is None
    pending = unlock.peek_key(vm.uuid) if disks else None
    owner_pw = pending[1] if pending is not None else None
    host_key = unlock.read_host_key(cfg.host_key) if disks and owner_pw is None else None
    started: list[str] = []
    how: dict[str, str] = {}
    try:
        for d, target in disks:
            way = opening.open_disk(d, vm, owner_pw, host_key)  # unlock, network, host key
            how[d.name] = way.how
            try:
                serve.serve_recorded(store, d, bytes(way.secret), target, readonly=False,
                                     who=ACTOR, timeout=cfg.timeout, keyslot=way.keyslot,
                                     how=way.how, bind=domain_binding(vm, dom))  # fmt: skip
            except VmshieldError as e:
                raise HookError(f"disk {d.name}: {str(e).splitlines()[0]}") from e
            finally:
                way.wipe()
            started.append(d.name)
        gate = start_usbgate(cfg, vm.name, slots) if slots else None
    except BaseException:
        for name in reversed(started):
            with contextlib.suppress(VmshieldError, OSError):
                serve.stop_disk(store, name, who=ACTOR, force=True)
        raise
    finally:
        for buf in (owner_pw, host_key):
            if buf is not None:
                buf[:] = b"\0" * len(buf)
    _record_starter(cfg, vm.name, dom)
    if "unlock" in how.values() and pending is not None:
        unlock.consume_key(pending[0])  # the key read above: never a newer unlock
    if restart:
        with contextlib.suppress(VmshieldError, OSError):
            restoremod.restore(store, host, who=ACTOR, host_key=cfg.host_key, timeout=cfg.timeout)
    took = round(time.monotonic() - began, 3)
    detail: dict[str, Any] = {"domain": dom.name, "disks": how, "usb_slots": len(slots),
                              "seconds": took}  # fmt: skip
    if gate is not None:
        detail["usbgate_pid"] = gate
    store.run(lambda r: r.append_audit(ACTOR, "libvirt.prepare", vm.name, detail))
    gate_text = f", usbgate with {len(slots)} slot(s)" if slots else ""
    return f"VM {vm.name}: served {', '.join(how) or 'no disks'}{gate_text} in {took:.2f} s"


def release(store: Keystore, cfg: HookConfig, vm: Vm, dom: Domain) -> str:
    if not _started_by(cfg, vm.name, dom):
        skipped: dict[str, Any] = {"domain": dom.name, "disks": [], "usbgate": False,
                                   "skipped": "not started by this domain"}  # fmt: skip
        store.run(lambda r: r.append_audit(ACTOR, "libvirt.release", vm.name, skipped))
        return f"VM {vm.name}: nothing to stop (its servers were not started by domain {dom.name})"
    # by whatever name the XML reaches the socket (an alias, `..`: #20 B2)
    used = {Endpoint(_resolved(x.socket), x.export) for x in dom.disks}
    used |= {Endpoint(_resolved(x.socket)) for x in dom.disks}  # a server of its own: no name
    stopped = []
    for d in store.run(lambda r: r.list_disks(vm.name)):
        s = _server(store, d.name)
        ep = None if s is None else Endpoint.parse(s.socket)
        if ep is not None and Endpoint(_resolved(ep.socket), ep.export) in used:
            serve.stop_disk(store, d.name, who=ACTOR, force=True)
            stopped.append(d.name)
    gate = stop_usbgate(cfg, vm.name)
    for n in range(len(dom.redirdevs)):
        usb_socket(cfg.run_dir, vm.name, n).unlink(missing_ok=True)
    _starter_file(cfg, vm.name).unlink(missing_ok=True)
    detail = {"domain": dom.name, "disks": stopped, "usbgate": gate}
    store.run(lambda r: r.append_audit(ACTOR, "libvirt.release", vm.name, detail))
    return f"VM {vm.name}: stopped {', '.join(stopped) or 'no disks'}" + (
        ", usbgate" if gate else ""
    )


def reconnect(store: Keystore, cfg: HookConfig, vm: Vm, dom: Domain) -> str:
    up: list[str] = []
    missing: list[str] = []
    disks = wanted_disks(dom, store.run(lambda r: r.list_disks(vm.name)), cfg, vm.name)
    host = HostFiles(cfg.run_dir)
    if any(isinstance(t, HostFiles) for _, t in disks) and hostdisk.ping(host) is None:
        # the host server died with libvirtd: QEMU is retrying; bring back what can come back
        with contextlib.suppress(VmshieldError, OSError):
            restoremod.restore(store, host, who=ACTOR, host_key=cfg.host_key, timeout=cfg.timeout)
    for d, target in disks:
        s = _server(store, d.name)
        alive = s is not None and serve.alive(s) and nbdproc.probe(target.socket)
        (up if alive else missing).append(d.name)
    if wanted_usb_slots(dom, cfg, vm.name):
        (up if usbgate_pid(cfg, vm.name) is not None else missing).append("usbgate")
    detail = {"domain": dom.name, "up": up, "missing": missing}
    store.run(lambda r: r.append_audit(ACTOR, "libvirt.reconnect", vm.name, detail))
    text = f"VM {vm.name}: still up: {', '.join(up) or 'nothing'}"
    return text + (f"; MISSING: {', '.join(missing)}" if missing else "")


OPERATIONS = {
    ("prepare", "begin"): prepare,
    ("release", "end"): release,
    ("reconnect", "begin"): reconnect,
}


def dispatch(cfg: HookConfig, op: str, sub: str, dom: Domain) -> str | None:
    """Run the operation; the line to print (None: nothing of vmshield's was involved)."""
    store = Keystore(cfg.db)
    if dom.files and (op, sub) == ("prepare", "begin"):
        # a vmshield image as a <disk type='file'|'block'>: refused whether or not it is
        # served now (the keystore is read for every domain with such disks: fail closed)
        store.run(lambda r: _refuse_images_as_files(r, dom))
    if not uses_vmshield(dom, cfg):
        return None
    vm = store.run(lambda r: find_vm(r, dom))
    if vm is None:
        raise HookError(f"domain {dom.name} uses vmshield sockets but no VM of that "
                        f"name or uuid is in the keystore {cfg.db}")  # fmt: skip
    try:
        if (op, sub) == ("prepare", "begin"):
            check_bound(vm, dom)
        if (op, sub) == ("migrate", "begin"):
            raise HookError(
                f"live migration of VM {vm.name} refused: its disks are served by this "
                "host only (shut it down, then start it on the other host)"
            )
        action = OPERATIONS.get((op, sub))
        said = None if action is None else action(store, cfg, vm, dom)
        with contextlib.suppress(VmshieldError, OSError):
            serve.audit_host_events(store)  # what the host server refused, into the audit
        return said
    except (VmshieldError, ValueError, OSError) as e:
        detail = {"domain": dom.name, "error": str(e)[:500]}
        with contextlib.suppress(VmshieldError):
            store.run(lambda r: r.append_audit(ACTOR, f"libvirt.{op}.refused", vm.name, detail))
        raise


HANDLED = {("prepare", "begin"), ("release", "end"), ("reconnect", "begin"), ("migrate", "begin")}


def run(argv: Sequence[str], *, config: Path) -> int:
    """What the installed hook file calls: ``main``, for the steps it handles in a process
    that may not dump core or be read by ptrace and whose memory stays out of swap (it reads
    the owner's password from the keyring, the host key or a clevis token, and opens
    keyslots), as the `vmshield` command and the server do (nbd_plugin.serve.hardening).
    What cannot be done is said on stderr, which libvirtd logs at debug level (and shows
    with the error of a hook that fails). Tests drive ``main`` in process."""
    if len(argv) >= 3 and (argv[1], argv[2]) in HANDLED:
        from nbd_plugin.serve.hardening import harden_process, lock_all_memory

        problems = harden_process()
        unlocked = lock_all_memory()
        if unlocked is not None:
            problems.append(
                f"memory not locked: {unlocked}, so the disks' secrets may be swapped out"
            )
        for problem in problems:
            print(f"vmshield hook: warning: {problem}", file=sys.stderr, flush=True)
    return main(argv, config=config)


def main(argv: Sequence[str], *, config: Path, stdin: IO[bytes] | None = None) -> int:
    """The hook's entry point: `NAME OP SUBOP EXTRA`, domain XML on stdin; exit status."""
    if len(argv) < 3:
        print("vmshield hook: expected NAME OP SUBOP [EXTRA] (run by libvirtd)", file=sys.stderr)
        return 2
    op, sub = argv[1], argv[2]
    if (op, sub) not in HANDLED:
        return 0
    try:
        data = (stdin or sys.stdin.buffer).read(4 * 1024 * 1024 + 1)
        dom = parse_domain(data)
        cfg = hookconf.load(config)
        said = dispatch(cfg, op, sub, dom)
    except (VmshieldError, ValueError, OSError) as e:
        print(f"vmshield: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)  # fmt: skip
        return 1
    if said:
        print(f"vmshield: {said}", file=sys.stderr)
    return 0
