"""What the kernel says about a process's hardening: its core limits, from /proc."""

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
