"""`vmshield doctor`'s checks of the host itself: directories, the libvirt hook, keyutils,
swap, /dev/kvm. Each returns `doctor.Check`s (see keystore.services.doctor); `run_checks`
runs every check, the host's and keystore.services.doctor's, in order."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

from keystore import paths
from keystore.location import Location
from keystore.services.doctor import (
    Check,
    Status,
    check_data_path,
    check_keystore,
    check_nbdkit,
    guarded,
)
from keystore.services.hookfile import hook_text
from keystore.services.nbdproc import plugin_path
from nbd_plugin import trust
from nbd_plugin.crypto import jit

#: where systemd's CacheDirectory=vmshield puts the units' numba cache
SYSTEM_CACHE = Path("/var/cache/vmshield")


def check_private_dir(name: str, path: Path, purpose: str) -> Check:
    """A directory only root or this user can change (nbd_plugin.trust's rules, the ones
    the command that uses it applies); a missing one is made so."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Check(name, Status.PASS, f"{path} does not exist yet (made 0700 when {purpose})")
    try:
        trust.private_dir(path, name, mode=None)
    except trust.Untrusted as e:
        return Check(name, Status.FAIL, str(e),
                     f"chown {os.geteuid()} {path} and chmod go-w {path} (or rm it: it is made "
                     f"again when {purpose}), and the same for a directory above it")  # fmt: skip
    return Check(name, Status.PASS, f"{path} (mode {stat.S_IMODE(st.st_mode):04o})")


def check_dirs() -> list[Check]:
    """The run directory (sockets, pid and log files) and the numba caches."""
    try:
        run = check_private_dir("run dir", paths.default_run_dir(), "a disk is served")
    except paths.NoRunDir as e:
        run = Check("run dir", Status.WARN, str(e), "log in (a session sets $XDG_RUNTIME_DIR)")
    checks = [run]
    cache = jit.cache_dir()
    if cache is None:
        checks.append(
            Check(
                "cache dir",
                Status.WARN,
                "no private directory for numba's cache: "
                "the data path compiles at every server start",
                "make ~/.cache yours and not writable by others",
            )
        )
    else:
        checks.append(check_private_dir("cache dir", Path(cache), "numba compiles"))
    if os.geteuid() == 0 and SYSTEM_CACHE.exists():
        checks.append(check_private_dir("unit cache dir", SYSTEM_CACHE, "a unit starts"))
    return checks


def _daemon_started(names: tuple[str, ...]) -> tuple[str, float] | None:
    """(name, start time) of the first running process called one of `names`."""
    try:
        btime = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        comm = text[text.find("(") + 1 : text.rfind(")")]
        if comm in names:
            start = int(text[text.rfind(")") + 2 :].split()[19])
            return comm, btime + start / ticks
    return None


def check_hook(hook: Path, expected: str) -> list[Check]:
    """The libvirt qemu hook: installed, the one this vmshield writes, read by libvirtd."""
    libvirt = shutil.which("libvirtd") or shutil.which("virtqemud")
    fix = "vmshield libvirt install-hook, then systemctl restart libvirtd"
    if not hook.exists():
        if libvirt is None:
            return [Check("libvirt hook", Status.SKIP, "libvirt is not installed")]
        return [
            Check(
                "libvirt hook",
                Status.WARN,
                f"{hook} is not installed: `virsh start` does not serve vmshield disks",
                fix,
            )
        ]
    if hook.read_text(errors="replace") != expected:
        return [
            Check(
                "libvirt hook",
                Status.WARN,
                f"{hook} is not the hook this vmshield "
                "writes (an older version, or another Python)",
                fix,
            )
        ]
    daemon = _daemon_started(("libvirtd", "virtqemud"))
    if daemon is None:
        return [Check("libvirt hook", Status.PASS, f"{hook} is current (libvirtd not running)")]
    name, started = daemon
    if started < hook.stat().st_mtime:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        return [
            Check(
                "libvirt hook",
                Status.WARN,
                f"{hook} is current but {name} started "
                f"before it was written ({when}): a new hook is read only at start",
                f"systemctl restart {name}",
            )
        ]
    return [Check("libvirt hook", Status.PASS, f"{hook} is current, {name} started after it")]


def check_keyutils() -> list[Check]:
    keyctl = shutil.which("keyctl")
    if keyctl is None:
        return [
            Check(
                "keyutils",
                Status.FAIL,
                "keyctl not found: `vmshield vm unlock` and the "
                "hook keep unlocks in root's kernel keyring",
                "apt install keyutils",
            )
        ]
    return [Check("keyutils", Status.PASS, f"{keyctl}")]


def _encrypted_swap(device: str) -> bool:
    """zram (RAM), or a device-mapper crypt device."""
    real = os.path.realpath(device)
    name = os.path.basename(real)
    if name.startswith("zram"):
        return True
    try:
        uuid = Path(f"/sys/block/{name}/dm/uuid").read_text()
    except OSError:
        return False
    return uuid.startswith("CRYPT-")


def check_swap(swaps: Path = Path("/proc/swaps")) -> list[Check]:
    """A served disk's master key lives in nbdkit's memory: swap must be encrypted or off."""
    try:
        lines = swaps.read_text().splitlines()[1:]
    except OSError as e:
        return [Check("swap", Status.WARN, f"cannot read {swaps}: {e}", "mount /proc")]
    devices = [line.split()[0] for line in lines if line.strip()]
    if not devices:
        return [Check("swap", Status.PASS, "off")]
    plain = [d for d in devices if not _encrypted_swap(d)]
    if plain:
        return [
            Check(
                "swap",
                Status.WARN,
                f"unencrypted swap on {', '.join(plain)}: a served "
                "disk's key could be written to it",
                "swapoff it, or encrypt it (crypttab: swap,cipher=aes-xts-plain64)",
            )
        ]
    return [Check("swap", Status.PASS, f"encrypted ({', '.join(devices)})")]


def check_kvm(device: Path = Path("/dev/kvm")) -> list[Check]:
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return [
            Check(
                "/dev/kvm",
                Status.WARN,
                "missing: QEMU can only emulate (TCG, slow)",
                "enable virtualisation in the firmware; modprobe kvm_intel or kvm_amd",
            )
        ]
    if not stat.S_ISCHR(st.st_mode):
        return [Check("/dev/kvm", Status.FAIL, "is not a character device", "rm it; reboot")]
    if not os.access(device, os.R_OK | os.W_OK):
        return [
            Check(
                "/dev/kvm",
                Status.WARN,
                "exists but you cannot open it",
                "add the user running QEMU to the kvm group",
            )
        ]
    return [Check("/dev/kvm", Status.PASS, "present and usable")]


# -- all of them ---------------------------------------------------------------------------

#: the plugin the Debian package installs for admins' own nbdkit command lines
PACKAGED_PLUGIN = Path("/usr/lib/vmshield/plugin.py")


def run_checks(location: Location, hook: Path, conf: Path, seconds: float) -> list[Check]:
    """Every check of `vmshield doctor`, in its order (`hook`: the installed hook file)."""
    plugins = [plugin_path()]
    if PACKAGED_PLUGIN.exists():
        plugins.append(PACKAGED_PLUGIN)
    checks = guarded("nbdkit", lambda: check_nbdkit(plugins[0]))
    if len(plugins) > 1 and checks[-1].name == "plugin":
        checks += [
            c for c in guarded("plugin", lambda: check_nbdkit(plugins[1])) if c.name == "plugin"
        ]
    checks += guarded("data path", lambda: check_data_path(seconds))
    checks += guarded("keystore", lambda: check_keystore(location))
    checks += guarded("dirs", check_dirs)
    checks += guarded("libvirt hook", lambda: check_hook(hook, hook_text(conf)))
    checks += guarded("keyutils", check_keyutils)
    checks += guarded("swap", check_swap)
    checks += guarded("/dev/kvm", check_kvm)
    return checks
