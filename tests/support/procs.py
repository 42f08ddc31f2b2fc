"""What the kernel says about a process's hardening (core limits, locked memory), from /proc."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from pathlib import Path


def core_limits(pid: int) -> tuple[str, str]:
    """(soft, hard) of "Max core file size" in /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit in /proc/PID/limits")


def unlimited_core() -> None:
    """A child's preexec_fn: what a shell with `ulimit -c unlimited` passes on."""
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def status_kib(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status (VmLck, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def mapped_kib(pid: int, path: Path) -> int:
    """Resident kB of the process's mappings of ``path`` (/proc/PID/smaps): a disk server's
    mapped image (nbd_plugin/crypto/mapped.py), which is page cache, not locked."""
    real, total, inside = os.path.realpath(path), 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):
            fields = line.split(maxsplit=5)
            inside = len(fields) == 6 and fields[5] == real
        elif inside and head == "Rss:":
            total += int(line.split()[1])
    return total


READ_SYSCALL = {"x86_64": 0, "aarch64": 63}.get(platform.machine())
"""read(2)'s number in /proc/PID/syscall on this kernel's architecture (64-bit userland)."""
UNLOCKABLE_FLAGS = {"io", "pf", "de", "mm"}
"""VmFlags of mappings mlockall leaves alone (VM_IO, VM_PFNMAP, VM_DONTEXPAND, VM_MIXEDMAP:
the kernel's own, such as [vvar] and [vdso])."""


def waiting_on_stdin(pid: int) -> bool:
    """Is the process blocked reading its stdin (a pipe)? /proc/PID/syscall (root or ptrace
    access) says read(0, ...), or /proc/PID/wchan says pipe_read. A command waiting there
    for a passphrase has done everything before it."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
        if READ_SYSCALL is not None and fields[:2] == [str(READ_SYSCALL), "0x0"]:
            return True
    except OSError:
        pass
    try:
        return Path(f"/proc/{pid}/wchan").read_text().strip() == "pipe_read"
    except OSError:
        return False


def wait_reading_stdin(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Return once ``proc`` blocks reading its stdin; fail if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while not waiting_on_stdin(proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"pid {proc.pid} never read its stdin"
        time.sleep(0.05)


def unlocked_mappings(pid: int) -> list[str]:
    """The process's mappings that are not locked in memory (no "lo" in their VmFlags of
    /proc/PID/smaps), but for those mlockall cannot lock (the kernel's own, [vsyscall]).
    After mlockall(MCL_CURRENT | MCL_FUTURE) there are none, including what was mapped after
    the call."""
    unlocked, mapping = [], ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):  # a mapping's first line: "start-end perms ... path"
            mapping = line
        elif head == "VmFlags:":
            flags = set(line.split()[1:])
            if "lo" not in flags and not flags & UNLOCKABLE_FLAGS and "[vsyscall]" not in mapping:
                unlocked.append(mapping)
    return unlocked
