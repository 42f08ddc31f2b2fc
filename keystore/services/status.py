"""`vmshield status`: what is running now, read from the keystore and from the kernel.

- every served disk: VM, nbdkit pid, since, read-only or not, who started it (the CLI and
  its user, the libvirt hook, or outside vmshield: by hand or a systemd unit), the clients
  connected to its socket (keystore.services.usage), the bytes its clients read and wrote
  (the plugin's `stats=` file, at most a second old: nbd_plugin/serve/stats.py);
- every usbgate process of this keystore (started by the hook or by hand) with its VM and
  the devices attached to the VM now (its `--state` file: usbgate/gateway.py);
- pending unlocks (`vmshield vm unlock`) with their expiry, from root's kernel keyring;
- the disks that start unattended (an enrolled host key), from the audit trail.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keystore.models import AuditEntry, Disk, Server, Vm
from keystore.repository import Repository
from keystore.services import nbdproc, serve, unlock, usage, usbhost
from keystore.services.libvirt_xml import usbgate_files
from keystore.services.store import Keystore
from nbd_plugin.osutil import statefile

#: how far back the audit trail is read for who started a server, unlocks, enrolments
AUDIT_WINDOW = 5000
HOOK_ACTOR = "libvirt-hook"


@dataclasses.dataclass(frozen=True)
class ServedDisk:
    disk: str
    vm: str
    pid: int | None
    socket: str | None
    since: datetime | None
    readonly: bool | None
    started_by: str
    clients: list[usage.Process]
    #: bytes read and written by clients since the server started (None: not published)
    read_bytes: int | None = None
    written_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["since"] = None if self.since is None else self.since.isoformat()
        out["clients"] = [c.to_json() for c in self.clients]
        return out


@dataclasses.dataclass(frozen=True)
class Gate:
    vm: str
    pid: int
    started_by: str
    command: str
    #: the devices attached to the VM through it (None: this usbgate publishes none)
    devices: list[dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class PendingUnlock:
    vm: str
    expires: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "expires": None if self.expires is None else self.expires.isoformat(),
        }


@dataclasses.dataclass(frozen=True)
class Unattended:
    disk: str
    vm: str
    since: datetime
    host_key: str

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "since": self.since.isoformat()}


@dataclasses.dataclass(frozen=True)
class Status:
    disks: list[ServedDisk]
    usbgates: list[Gate]
    unlocks: list[PendingUnlock]
    unattended: list[Unattended]

    def to_json(self) -> dict[str, Any]:
        return {
            "disks": [d.to_json() for d in self.disks],
            "usbgates": [dataclasses.asdict(g) for g in self.usbgates],
            "pending_unlocks": [u.to_json() for u in self.unlocks],
            "unattended": [u.to_json() for u in self.unattended],
        }


@dataclasses.dataclass(frozen=True)
class _Records:
    disks: list[Disk]
    servers: list[Server]
    vms: list[Vm]
    audit: list[AuditEntry]


async def _records(repo: Repository) -> _Records:
    return _Records(
        await repo.list_disks(),
        await repo.list_servers(),
        await repo.list_vms(),
        await repo.list_audit(None, AUDIT_WINDOW),
    )


def _starter(audit: Sequence[AuditEntry], server: Server) -> str:
    """Who started a recorded server: the audit row that recorded its pid."""
    for e in reversed(audit):
        if e.action == "disk.serve" and e.detail.get("pid") == server.pid:
            return "libvirt hook" if e.actor == HOOK_ACTOR else f"CLI ({e.actor})"
    return "vmshield"


def _unit_of(pid: int | None) -> str | None:
    """The systemd service a process runs in, from its cgroup."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for part in text.strip().rsplit("/", 1)[-1:]:
        if part.endswith(".service"):
            return part
    return None


def _served(records: _Records) -> list[ServedDisk]:
    servers = {s.disk: s for s in records.servers}
    out = []
    for d in records.disks:
        s = servers.get(d.name)
        if s is not None and serve.alive(s):  # its own nbdkit, or the host server's export
            out.append(ServedDisk(d.name, d.vm, s.pid, s.socket, s.started, s.readonly,
                                  _starter(records.audit, s), serve.clients(s),
                                  *serve.io_counts(s)))  # fmt: skip
            continue
        for p in usage.holders(d.path):  # served outside vmshield
            unit = _unit_of(p.pid)
            how = f"systemd unit {unit}" if unit else "outside vmshield (by hand)"
            sock = _socket_arg(p.pid)
            given = _arg(p.pid, "stats=")
            io = serve.published_io(Path(given), p.pid) if given else (None, None)
            out.append(ServedDisk(d.name, d.vm, p.pid, sock, _start_time(p.pid), None, how,
                                  usage.clients(sock) if sock else [], *io))  # fmt: skip
    return out


def _arg(pid: int | None, prefix: str) -> str | None:
    """The value of a `key=value` parameter of a process's command line."""
    args = usage.argv_of(pid) if pid is not None else None
    return next((a[len(prefix) :] for a in args or () if a.startswith(prefix)), None)


def _socket_arg(pid: int | None) -> str | None:
    """The `-U SOCKET` of an nbdkit command line."""
    args = usage.argv_of(pid) if pid is not None else None
    if not args:
        return None
    for i, a in enumerate(args[:-1]):
        if a in ("-U", "--unix"):
            return args[i + 1]
    return next((a.split("=", 1)[1] for a in args if a.startswith("--unix=")), None)


def _start_time(pid: int | None) -> datetime | None:
    """When a process started (its /proc entry's start time, from boot time + ticks)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return datetime.fromtimestamp(btime + ticks / os.sysconf("SC_CLK_TCK"), UTC)


def _same_keystore(args: Sequence[str], store: Keystore, vms: set[str], vm: str) -> bool:
    """Does this usbgate read our keystore? (its --db, else the VM names decide)"""
    if "--db" not in args[:-1]:
        return vm in vms
    given = args[args.index("--db") + 1]
    ours = store.location.file
    if ours is not None:
        return os.path.abspath(given) == os.path.abspath(ours)
    return given == str(store.location)


def _gates(store: Keystore, vms: set[str], run_dirs: Sequence[Path]) -> list[Gate]:
    hook_pids: dict[int, str] = {}
    for run_dir in run_dirs:
        for pidfile in run_dir.glob("*-usbgate.pid"):
            vm = pidfile.name.removesuffix("-usbgate.pid")
            if usbgate_files(run_dir, vm)[0] == pidfile and (pid := nbdproc.read_pid(pidfile)):
                hook_pids[pid] = vm
    out = []
    for name in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        args = usage.argv_of(int(name)) if name.isdigit() else None
        if not args or not any(os.path.basename(a) == "usbgate" for a in args[:2]):
            continue
        if "host" in args[1:3] and "serve" in args[1:4]:
            out += _host_gates(store, vms, int(name), args)
            continue
        if "run" not in args or "--vm" not in args[:-1]:
            continue
        vm = args[args.index("--vm") + 1]
        if not _same_keystore(args, store, vms, vm):
            continue
        pid = int(name)
        how = "libvirt hook" if hook_pids.get(pid) == vm else "outside the hook"
        out.append(Gate(vm, pid, how, usage.redact(args), _attached(args, pid)))
    return out


def _attached(args: Sequence[str], pid: int) -> list[dict[str, Any]] | None:
    """The devices usbgate `pid` says are attached, from its `--state FILE`."""
    if "--state" not in args[:-1]:
        return None
    state = statefile.read(args[args.index("--state") + 1])
    if state is None or state.get("pid") != pid or not isinstance(state.get("attached"), list):
        return None
    return [a for a in state["attached"] if isinstance(a, dict)]


def _host_gates(store: Keystore, vms: set[str], pid: int, args: Sequence[str]) -> list[Gate]:
    """The VMs of ours a `usbgate host serve` serves, asked over its control socket."""
    if "--db" in args[:-1] and not _same_keystore(args, store, vms, ""):
        return []
    control = (
        args[args.index("--control") + 1] if "--control" in args[:-1] else usbhost.DEFAULT_CONTROL
    )
    command = usage.redact(args)
    try:
        served = usbhost.request(control, {"op": "list"}, timeout=2.0)["vms"]
    except usbhost.UsbHostError as e:
        return [Gate("?", pid, f"usbgate host ({e})", command)]
    return [Gate(v["vm"], pid, "usbgate host", command) for v in served if v["vm"] in vms]


def _keyring_unlocks() -> set[str]:
    """VM uuids with an unlock waiting in the kernel keyring (/proc/keys: what we may view)."""
    prefix = unlock.key_name("")
    found: set[str] = set()
    try:
        lines = Path("/proc/keys").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split(None, 8)
        # ID FLAGS USAGE TIMEOUT PERM UID GID TYPE DESCRIPTION: SIZE
        mine = len(fields) == 9 and fields[7] == "user" and fields[8].startswith(prefix)
        # FLAGS: I instantiated; R revoked, D dead, N negative, i invalidated (an unlock that
        # was cancelled or consumed stays listed until the kernel's key GC runs)
        live = mine and "I" in fields[1] and not set("RDNi") & set(fields[1])
        if live and fields[3] != "expd":
            found.add(fields[8][len(prefix) :].split(":", 1)[0])
    return found


def _unlocks(records: _Records) -> list[PendingUnlock]:
    waiting = _keyring_unlocks()
    out = []
    for v in records.vms:
        if v.uuid not in waiting:
            continue
        row = next((e for e in reversed(records.audit)
                    if e.action == "vm.unlock" and e.vm == v.name), None)  # fmt: skip
        seconds = row.detail.get("seconds") if row is not None else None
        expires = row.ts + timedelta(seconds=seconds) if row and isinstance(seconds, int) else None
        out.append(PendingUnlock(v.name, expires))
    return out


def _unattended(records: _Records) -> list[Unattended]:
    current = {d.name: d for d in records.disks}
    enrolled: dict[str, AuditEntry] = {}
    for e in records.audit:
        name = e.detail.get("disk")
        if e.action == "disk.enroll_host" and isinstance(name, str):
            enrolled[name] = e
        elif e.action == "disk.unenroll_host" and isinstance(name, str):
            enrolled.pop(name, None)
    return [
        Unattended(name, current[name].vm, e.ts, str(e.detail.get("host_key", "")))
        for name, e in sorted(enrolled.items())
        if name in current and current[name].state.value == "ready"
    ]


def collect(store: Keystore, run_dirs: Sequence[Path]) -> Status:
    """What runs now: the keystore's records checked against the kernel."""
    records = store.run(_records)
    gates = _gates(store, {v.name for v in records.vms}, run_dirs)
    return Status(_served(records), gates, _unlocks(records), _unattended(records))
