"""Who uses a disk right now: the processes holding its image, the NBD clients connected to
its socket, the libvirt domain the qemu hook started it for.

Everything is read from the kernel, never from what vmshield recorded: /proc/locks and
/proc/PID/fd for an image's holders, `ss` (sock_diag) for the peer of each connection
accepted on a unix socket, /proc/PID/cmdline for what a process is. Processes of other
users are visible to root only; for anyone else a client may show as "pid ?".

A command line is shown with any literal `passphrase=` replaced (the plugin's test-only
form would otherwise put a secret into a message or the audit trail).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

_MAX_ARGV = 160


@dataclasses.dataclass(frozen=True)
class Process:
    """A process as a person wants it named: its pid and (shortened) command line."""

    pid: int | None
    argv: str

    def __str__(self) -> str:
        return f"pid {'?' if self.pid is None else self.pid}: {self.argv}"

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "command": self.argv}


def redact(args: Iterable[str]) -> str:
    """A command line to show: literal passphrases replaced, shortened to a line."""
    shown: list[str] = []
    for a in args:
        if not shown:
            a = os.path.basename(a)  # `nbdkit`, not `/usr/bin/nbdkit`
        key, eq, value = a.partition("=")
        if eq and key.endswith("passphrase") and not value.startswith(("+", "-")):
            a = f"{key}=(hidden)"  # +FILE, -FD and - name where it is, not what
        shown.append(a)
    text = " ".join(shown)
    return text if len(text) <= _MAX_ARGV else text[: _MAX_ARGV - 3] + "..."


def argv_of(pid: int) -> list[str] | None:
    """The arguments of `pid`, or None if it is gone (or a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return [os.fsdecode(a) for a in raw.rstrip(b"\0").split(b"\0")]


def process(pid: int) -> Process | None:
    args = argv_of(pid)
    return None if args is None else Process(pid, redact(args))


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _fd_links(pid: int) -> Iterator[tuple[str, str]]:
    """(fd path, link target) of every descriptor of `pid` we may read."""
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return
    for fd in fds:
        with contextlib.suppress(OSError):
            yield f"{base}/{fd}", os.readlink(f"{base}/{fd}")


# -- an image's holders -------------------------------------------------------------------


def _lockers(dev: int, ino: int) -> list[int] | None:
    """The pids /proc/locks gives for locks (flock, POSIX, OFD) on this inode; None if
    there is no lock. (A pid there may be the parent that took the lock before forking.)"""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    pids = []
    for line in text.splitlines():
        fields = line.split()
        if want in fields:
            i = fields.index(want)
            pids.append(int(fields[i - 1]) if fields[i - 1].isdigit() else 0)
    return pids or None


def holders(path: str | Path) -> list[Process]:
    """The processes that hold a lock on the image at `path` (as nbdkit serving it does),
    each named by pid and command line; [] if nothing locks it or it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    lockers = _lockers(st.st_dev, st.st_ino)
    if lockers is None:
        return []
    found: list[Process] = []
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        for fdpath, target in _fd_links(pid):
            if not target.startswith("/"):
                continue  # sockets, pipes, anonymous inodes
            try:
                fst = os.stat(fdpath)
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                p = process(pid)
                if p is not None:
                    found.append(p)
                break
    if not found:  # a server is not dumpable: its fds are root's to read, its argv is not
        found = [p for p in map(process, sorted(set(lockers) - {0, me})) if p is not None]
        found = found or _serving_by_argv(str(path))
    return found


def _serving_by_argv(path: str) -> list[Process]:
    """Processes whose command line names the image (`image=PATH` of an nbdkit)."""
    wanted = {f"image={path}", f"image={os.path.realpath(path)}"}
    out = []
    for pid in _pids():
        args = argv_of(pid)
        if args and pid != os.getpid() and wanted.intersection(args):
            out.append(Process(pid, redact(args)))
    return out


# -- a socket's clients -------------------------------------------------------------------


def _accepted(sock: Path) -> set[int]:
    """Inodes of the connected sockets bound to `sock`: one per accepted connection."""
    want = os.fsencode(sock)
    out: set[int] = set()
    try:
        lines = Path("/proc/net/unix").read_bytes().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        fields = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path; St 03 = connected
        if len(fields) == 8 and fields[5] == b"03" and fields[7] == want:
            out.add(int(fields[6]))
    return out


def _peers(inodes: set[int]) -> dict[int, int | None]:
    """Local inode -> peer inode, from `ss` (the kernel's sock_diag)."""
    exe = shutil.which("ss") or shutil.which("ss", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if exe is None or not inodes:
        return dict.fromkeys(inodes)
    done = subprocess.run(
        [exe, "-x", "-n", "-H"], capture_output=True, timeout=10, check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
    )  # fmt: skip
    found: dict[int, int | None] = dict.fromkeys(inodes)
    for line in done.stdout.decode(errors="replace").splitlines():
        parts = line.rsplit(None, 3)  # ... LOCAL_ADDR LOCAL_INODE PEER_ADDR PEER_INODE
        if len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit():
            local = int(parts[1])
            if local in found:
                found[local] = int(parts[3])
    return found


def _socket_owners(inodes: set[int]) -> dict[int, int]:
    """Socket inode -> the pid that has it open."""
    want = {f"socket:[{i}]": i for i in inodes}
    owners: dict[int, int] = {}
    if not want:
        return owners
    for pid in _pids():
        for _, target in _fd_links(pid):
            if target in want:
                owners.setdefault(want[target], pid)
        if len(owners) == len(want):
            break
    return owners


def clients(sock: str | Path) -> list[Process]:
    """The processes connected to the NBD server on unix socket `sock`, one per connection
    (pid None where the peer's process cannot be seen)."""
    accepted = _accepted(Path(sock))
    peers = _peers(accepted)
    owners = _socket_owners({p for p in peers.values() if p is not None})
    me = os.getpid()
    out = []
    for peer in peers.values():
        pid = owners.get(peer) if peer is not None else None
        if pid == me:
            continue  # our own probe
        p = process(pid) if pid is not None else None
        out.append(p or Process(None, "(a client this user cannot see)"))
    return sorted(out, key=lambda p: (p.pid is None, p.pid or 0))


# -- the libvirt domain the hook started --------------------------------------------------


def starter_file(run_dir: Path, vm: str) -> Path:
    """Where the qemu hook records which domain it served VM's disks for (until release)."""
    return run_dir / f"{vm}.domain"


def running_domain(run_dir: Path, vm: str) -> tuple[str, Process] | None:
    """(domain name, its QEMU process) if the hook started VM's disks for a domain that is
    still running; None if it did not, or that domain's QEMU is gone."""
    try:
        uuid, _, name = starter_file(run_dir, vm).read_text().strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return None
    for pid in _pids():
        args = argv_of(pid)
        if not args or "qemu" not in os.path.basename(args[0]):
            continue
        named = any(a == f"guest={name}" or a.startswith(f"guest={name},") for a in args)
        if (uuid != "-" and uuid in args) or named:
            p = process(pid)
            if p is not None:
                return name, p
    return None
