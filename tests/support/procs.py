"""What the kernel says about a process's hardening (core limits, locked memory), from /proc."""

from __future__ import annotations

import resource
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


def waiting_on_stdin(pid: int) -> bool:
    """Is the process blocked in read(0, ...) (/proc/PID/syscall; needs root or ptrace
    access)? A command waiting there for a passphrase has done everything before it."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return fields[:2] == ["0", "0x0"]
