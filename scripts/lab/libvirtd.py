"""A private libvirtd for the tests and the demo: system mode (QEMU as root), nothing of the
host's libvirt touched.

The daemon runs in its own mount namespace (`unshare --mount`) where a scratch directory is
bind-mounted over /etc/libvirt (libvirtd.conf, qemu.conf with the recipe that works here:
QEMU as root, stdio_handler = "file"; hooks/qemu.d), /run/libvirt, /var/lib/libvirt and
/var/log/libvirt, and copies of /etc/passwd and /etc/group that add the `libvirt-qemu` user
and group the QEMU driver resolves at start. /var/cache/libvirt is <repo>/var/libvirt-cache,
kept between runs: QEMU's capabilities are probed once (~8 s), not at every run.
virsh reaches the daemon through its socket: qemu:///system?socket=DIR/run/libvirt-sock.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.lab import ROOT
from scripts.lab.guest import Guest

MOUNTS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
}
CACHE = ROOT / "var" / "libvirt-cache"
QEMU_CONF = 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'


def available() -> str | None:
    """Why a private libvirtd cannot run here (None: it can)."""
    for tool in ("libvirtd", "virsh", "unshare", "qemu-system-x86_64", "keyctl"):
        if shutil.which(tool) is None:
            return f"{tool} not found (scripts/setup installs it)"
    if os.geteuid() != 0:
        return "a system-mode libvirtd in a private mount namespace needs root"
    return None


@dataclass
class Libvirtd:
    """One libvirtd process; `restart()` keeps its state (domains, hooks, running QEMUs)."""

    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def hooks_dir(self) -> Path:
        return self.base / "etc" / "hooks" / "qemu.d"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.base / 'run' / 'libvirt-sock'}"

    def prepare(self) -> None:
        for d in MOUNTS:
            (self.base / d).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.hooks_dir.mkdir(parents=True, exist_ok=True)
        (self.base / "log" / "qemu").mkdir(parents=True, exist_ok=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        for conf in ("libvirt.conf", "libvirtd.conf"):
            src = Path("/etc/libvirt") / conf
            if src.exists():
                shutil.copy(src, self.base / "etc" / conf)
        (self.base / "etc" / "qemu.conf").write_text(QEMU_CONF)
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        if not re.search(r"^libvirt-qemu:", group, re.M):
            group += "libvirt-qemu:x:64055:\n"
        if not re.search(r"^libvirt-qemu:", passwd, re.M):
            passwd += "libvirt-qemu:x:64055:64055::/nonexistent:/usr/sbin/nologin\n"
        (self.base / "passwd").write_text(passwd)
        (self.base / "group").write_text(group)
        binds = [(self.base / k, v) for k, v in MOUNTS.items()] + [
            (CACHE, "/var/cache/libvirt"),
            (self.base / "passwd", "/etc/passwd"),
            (self.base / "group", "/etc/group"),
        ]
        lines = ["set -e"]
        for src, dst in binds:
            if not dst.startswith("/etc/p") and not dst.startswith("/etc/g"):
                lines.append(f"mkdir -p {dst}")
            lines.append(f"mount --bind {src} {dst}")
        # its own pid file: the default /run/libvirtd.pid would let only one daemon run
        lines.append(f"exec libvirtd --pid-file {self.base / 'libvirtd.pid'}")
        (self.base / "ns.sh").write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> None:
        sock = self.base / "run" / "libvirt-sock"
        sock.unlink(missing_ok=True)
        log = (self.base / "libvirtd.log").open("ab")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", str(self.base / "ns.sh")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited {self.proc.returncode}: {self.log_tail()}")
            if sock.exists() and self.virsh("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"libvirtd did not answer within {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 15) -> str:
        path = self.base / "libvirtd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def virsh(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def state(self, domain: str) -> str:
        return self.virsh("domstate", domain).stdout.strip()

    def wait_state(self, domain: str, state: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(domain) == state:
                return True
            time.sleep(0.1)
        return False

    def destroy_all(self) -> None:
        for name in self.virsh("list", "--name", check=False).stdout.split():
            self.virsh("destroy", name, check=False)


def domain_xml(
    name: str, uuid: str, guest: Guest, mode: str, devices: str, console: Path
) -> str:  # fmt: skip
    """A TCG domain booting the test guest in `mode`; `devices` from `vmshield libvirt devices`.

    The serial console is a pty (the guest's shell mode waits on it) logged to `console`.
    """
    body = "\n".join("    " + line for line in devices.splitlines())
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest.kernel}</kernel>
    <initrd>{guest.initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet vmshield.mode={mode}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'>
    <model fallback='allow'>qemu64</model>
    <feature policy='require' name='rdrand'/>
  </cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{body}
    <serial type='pty'>
      <log file='{console}' append='off'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
