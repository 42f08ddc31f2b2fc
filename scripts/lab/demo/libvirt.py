"""The libvirt step of scripts/demo: `virsh start` serves the disk through the vmshield hook.

A private libvirtd (scripts/lab/libvirtd.py: system mode in its own mount namespace, nothing of
the host's libvirt touched) runs the hook that `vmshield libvirt install-hook` installs. The
step shows a start refused without an unlock, an owner unlock and a boot that writes the
marker (ciphertext at rest again), an unattended start with an enrolled host key, and measures
`virsh start` -> the guest's first disk read with the hook and with a disk served by hand.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from pathlib import Path

from keystore.services import nbdproc
from nbd_plugin.luks import payload_region
from scripts.lab.demo.support import Host, Report, StepFailed
from scripts.lab.guest import DONE, MARKER, RAW_OFFSET, Guest, read_export
from scripts.lab.libvirtd import Libvirtd, available, domain_xml

VM, DISK = "demo-lv", "demo-lv-0"
USER = "alice"
#: printed by the guest's shell mode once /dev/vda exists (the kernel has read its partition
#: table: the guest's first disk read) and its size was read
FIRST_READ = "vmshield guest shell"
RUNS = 3


def libvirt_unavailable() -> str | None:
    return available()


class Virsh:
    """virsh against the private daemon, each command printed as the admin would type it."""

    def __init__(self, lv: Libvirtd, r: Report) -> None:
        self.lv, self.r = lv, r

    def __call__(self, *args: str, expect_ok: bool = True, show: bool = True) -> str:
        if show:
            self.r.command(["virsh", *args])
        p = self.lv.virsh(*args, check=False)
        said = (p.stdout + p.stderr).strip()
        if show and said:
            self.r.output(said, 4)
        if expect_ok and p.returncode != 0:
            raise StepFailed(f"virsh {' '.join(args)} failed: {p.stderr.strip()}")
        return said


def _define(host: Host, v: Virsh, guest: Guest, mode: str, devices: str) -> Path:
    console = host.path("lv-console.log")
    xml = host.path(f"{VM}.xml")
    uuid = json.loads(host.vmshield("vm", "show", VM, "--json", show=False).stdout)["vm"]["uuid"]
    xml.write_text(domain_xml(VM, uuid, guest, mode, devices, console))
    v("define", str(xml), show=mode == "write")
    return console


def _time_to_first_read(v: Virsh, console: Path, timeout: float = 60) -> float:
    """Seconds from `virsh start` to the guest's console saying it read its disk."""
    console.unlink(missing_ok=True)
    started = time.monotonic()
    v("start", VM, show=False)
    deadline = started + timeout
    while time.monotonic() < deadline:
        if console.exists() and FIRST_READ in console.read_text(errors="replace"):
            took = time.monotonic() - started
            v("destroy", VM, show=False)
            return took
        time.sleep(0.005)
    v("destroy", VM, show=False, expect_ok=False)
    raise StepFailed(f"the guest never printed {FIRST_READ!r} within {timeout} s")


def step_libvirt(host: Host, r: Report, guest: Guest) -> None:
    """virsh start/destroy drive the disk server and usbgate through the vmshield qemu hook."""
    pw = str(host.path("secrets/alice.pw"))
    host.vmshield("vm", "add", VM, "--owner", USER)
    # a PBKDF2 keyslot of 1000 iterations: the timing below shows the hook, not a 2 s KDF
    host.vmshield("disk", "create", VM, "--size", "64M", "--pbkdf-iterations", "1000",
                  "--password-file", pw)  # fmt: skip
    lv = Libvirtd(host.path("libvirt"))
    lv.prepare()
    conf, run_dir, key = host.path("hook.conf"), host.path("lvrun"), host.path("host.key")
    host.vmshield("libvirt", "install-hook", "--hooks-dir", str(lv.hooks_dir), "--config",
                  str(conf), "--run-dir", str(run_dir), "--host-key", str(key))  # fmt: skip
    print("  starting a private libvirtd (its own mount namespace: the host's /etc/libvirt is "
          "not touched)")  # fmt: skip
    lv.start()
    host.cleanups.append(lambda: _stop_host_server(run_dir))  # the hook started it on demand
    host.cleanups.append(lv.stop)

    def destroy() -> None:
        lv.virsh("destroy", VM, check=False)

    host.cleanups.append(destroy)
    v = Virsh(lv, r)
    devices = host.vmshield("libvirt", "devices", VM, "--config", str(conf), limit=12).stdout

    # 1. no unlock: the hook refuses, libvirt shows its one line, nothing runs
    console = _define(host, v, guest, "write", devices)
    said = v("start", VM, expect_ok=False)
    line = next((x for x in said.splitlines() if "vmshield:" in x), "")
    r.check(
        f"unlock VM {VM} first" in line and lv.state(VM) == "shut off",
        "without an unlock `virsh start` fails with the hook's reason; nothing was started",
    )

    # 2. the owner unlocks; the guest boots from the encrypted disk and writes the marker
    host.vmshield("vm", "unlock", VM, "--for", "5m", "--password-file", pw)
    v("start", VM)
    r.check(lv.wait_state(VM, "shut off", 120), "the guest ran and powered off by itself")
    text = console.read_text(errors="replace") if console.exists() else ""
    r.check(f"{DONE} mode=write" in text, "the libvirt-started guest wrote the marker")
    rows = host.audit(6)
    released = [x for x in rows if x["action"] == "libvirt.release"]
    r.check(bool(released) and released[-1]["detail"].get("disks") == [DISK],
            f"the guest's poweroff ran the hook's release: {DISK}'s server and usbgate "
            "stopped (audit libvirt.release)")  # fmt: skip
    disks = json.loads(host.vmshield("disk", "list", "--json", show=False).stdout)
    image = Path(next(d["path"] for d in disks if d["name"] == DISK))
    data = image.read_bytes()
    offset, length = payload_region(str(image))
    ro = host.path("run/lv-ro.sock")
    host.vmshield("disk", "serve", DISK, "--readonly", "--socket", str(ro), "--password-file", pw,
                  show=False)  # fmt: skip
    try:
        plain = read_export(str(ro))
    finally:
        host.vmshield("disk", "stop", DISK, show=False)
    r.check(MARKER not in data and MARKER[:16] not in data[offset : offset + length]
            and plain[RAW_OFFSET : RAW_OFFSET + len(MARKER)] == MARKER,
            "marker absent from the ciphertext, present in the decrypted view")  # fmt: skip

    # 3. unattended: a host-key keyslot; the first-read time with the hook
    host.vmshield("disk", "enroll-host", DISK, "--host-key", str(key), "--password-file", pw)
    console = _define(host, v, guest, "shell", devices)
    print(f"  timing `virsh start` -> the guest reads its disk ({RUNS} runs each)")
    hooked, own = [], []
    for _ in range(RUNS):
        hooked.append(_time_to_first_read(v, console))
        prep = [x for x in host.audit(8) if x["action"] == "libvirt.prepare"]
        own.append(float(prep[-1]["detail"].get("seconds", 0)) if prep else 0.0)
    host.vmshield("disk", "unenroll-host", DISK, "--host-key", str(key))
    said = v("start", VM, expect_ok=False, show=False)
    r.check("unlock VM" in said, "after unenroll-host the start fails again (unlock VM first)")

    # 4. the same domain with the disk served by hand (a socket the hook ignores), a fresh
    # server before each start as an admin would start it (a server that already served a
    # boot is warmer: its numba kernels are loaded)
    hand = host.path("run/hand.sock")
    bare = host.vmshield("libvirt", "devices", VM, "--config", str(conf), "--usb-slots", "0",
                         "--isolated", show=False).stdout  # fmt: skip
    _define(host, v, guest, "shell", bare.replace(str(run_dir / f"{DISK}.sock"), str(hand)))
    by_hand = []
    for _ in range(RUNS):
        host.vmshield("disk", "serve", DISK, "--socket", str(hand), "--password-file", pw,
                      show=False)  # fmt: skip
        try:
            by_hand.append(_time_to_first_read(v, console))
        finally:
            host.vmshield("disk", "stop", DISK, show=False)
    h, p, o = statistics.median(hooked), statistics.median(by_hand), statistics.median(own)
    print(f"  virsh start -> first disk read, median of {RUNS}: with the hook {h:.2f} s "
          f"(runs {', '.join(f'{x:.2f}' for x in hooked)}; the hook itself took {o:.2f} s: "
          f"nbdkit start, host-key keyslot, usbgate start); disk served by hand beforehand "
          f"{p:.2f} s (runs {', '.join(f'{x:.2f}' for x in by_hand)}, no USB)")  # fmt: skip
    lv.stop()


def _stop_host_server(run_dir: Path) -> None:
    """SIGTERM the host disk server the hook started in `run_dir` (it outlives the domains)."""
    files = nbdproc.HostFiles(run_dir)
    pid = nbdproc.read_pid(files.pidfile)
    if pid is not None and nbdproc.is_host_server(pid, files):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10  # gone before the demo says nothing runs
        while nbdproc.is_host_server(pid, files) and time.monotonic() < deadline:
            time.sleep(0.05)
