#!/usr/bin/env python3
"""Build (once, then from cache) the tiny Linux guest of the end-to-end test and the demo.

The guest is Debian's cloud kernel plus a busybox-static initramfs whose /init writes a known
marker to /dev/vda (or reads it back), prints a done-line on the serial console and powers off.
Nothing is installed system-wide: the kernel package is fetched with `apt-get download` and
unpacked from its data archive (what `dpkg-deb -x` would unpack, minus what we do not need).

Output (default <repo>/var/guest, or $VMSHIELD_GUEST_DIR, or --dir):
  vmlinuz              the kernel
  initramfs.cpio.gz    busybox, /dev/console, the virtio modules, /init
  guest.json           what was built from what; the cache key
  debs/                the downloaded .deb files

On success it prints shell assignments (`eval "$(scripts/build-guest)"`):
  VMLINUZ=/path/vmlinuz
  INITRD=/path/initramfs.cpio.gz

Boot it (TCG: the KVM here is nested and does not run Linux guests):
  qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -m 256 -nodefaults -no-user-config \\
    -display none -serial stdio -no-reboot -kernel "$VMLINUZ" -initrd "$INITRD" \\
    -append 'console=ttyS0 panic=-1 quiet vmshield.mode=write' \\
    -drive file=nbd+unix:///?socket=SOCK,format=raw,if=virtio

Kernel command line, read by /init:
  vmshield.mode=write  mke2fs over the first 32 MiB of /dev/vda, put the marker in /marker.txt,
                       write the marker raw at byte 48 MiB, sync.
  vmshield.mode=read   print "VMSHIELD-FILE: <line 1 of /marker.txt>" and
                       "VMSHIELD-RAW: <the marker-sized bytes at 48 MiB>".
  vmshield.mode=shell  an interactive shell on the console (for the demo); poweroff on exit.
  vmshield.mode=agent  (the usb variant) read shell commands, one a line, from the second
                       serial port ttyS1; answer there with their output, then
                       "VMSHIELD-AGENT-END rc=N"; "quit" ends. Kernel messages at log level
                       7 go to the console (USB connects/disconnects, I/O errors).
Then "VMSHIELD-GUEST-DONE mode=<mode>" and poweroff. On any failure "VMSHIELD-GUEST-FAIL: why"
and poweroff, no done-line. QEMU exits 0 even when the guest kernel panics: check the done-line.
The disk must be at least 64 MiB.

`--variant usb` builds the guest of the USB tests in <repo>/var/guest-usb: Debian's generic
kernel (linux-image-amd64: the cloud kernel has no USB) with xhci-pci, usb-storage, sd_mod and
ext4 (and what they depend on, from each module's depends=: the packages ship no modules.dep).
Boot it with `-device qemu-xhci -device usb-redir,chardev=...` and a second `-serial` for the
agent, `usb_storage.delay_use=0` on the command line (see scripts/lab/guest.py: UsbGuest).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scripts.lab import ROOT

BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class Variant:
    """One kind of guest: which kernel package, which modules /init loads, where it is cached."""

    meta_package: str
    flavour: str  # the versioned package is linux-image-<abi>-<flavour>
    modules: tuple[str, ...]  # their dependencies are added from each module's depends=
    cache: str  # <repo>/var/<cache>


VARIANTS = {
    # The disk tests: virtio-blk over NBD. The cloud kernel boots fastest.
    "virtio": Variant(
        meta_package="linux-image-cloud-amd64",
        flavour="cloud-amd64",
        modules=("virtio_pci", "virtio_blk"),
        cache="guest",
    ),
    # The USB tests: the cloud kernel has no USB at all; the generic one has it as modules.
    # ext4 mounts the stick's ext2 and asks the crypto API for crc32c when it mounts.
    "usb": Variant(
        meta_package="linux-image-amd64",
        flavour="amd64",
        modules=("xhci_pci", "usb_storage", "sd_mod", "ext4", "crc32c_generic"),
        cache="guest-usb",
    ),
}
META_PACKAGE = VARIANTS["virtio"].meta_package
WANTED_MODULES = VARIANTS["virtio"].modules

MARKER = "This is a test for virtual machine disk encryption!"
FS_KIB = 32 * 1024
RAW_OFFSET = 48 * 1024 * 1024
MIN_DISK = 64 * 1024 * 1024

INIT = Path(__file__).with_name("guest-init.sh")
"""The guest's /init, a template: @MARKER@, @FS_KIB@, @RAW_OFFSET@, @MIN_DISK@ are filled in."""


def log(msg: str) -> None:
    print(f"build-guest: {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        argv, check=True, text=True, **kw
    )
    return done


def render_init() -> bytes:
    text = (
        INIT.read_text()
        .replace("@MARKER@", MARKER)
        .replace("@FS_KIB@", str(FS_KIB))
        .replace("@RAW_OFFSET@", str(RAW_OFFSET))
        .replace("@MIN_DISK@", str(MIN_DISK))
    )
    return text.encode()


# --- Debian packages -----------------------------------------------------------------------


def resolve_kernel_package(variant: Variant = VARIANTS["virtio"]) -> str:
    """The versioned linux-image-*-<flavour> the variant's meta package depends on."""
    meta, flavour = variant.meta_package, re.escape(variant.flavour)
    for attempt in range(2):
        q = subprocess.run(
            ["apt-cache", "depends", meta], capture_output=True, text=True, check=False
        )
        names = re.findall(rf"^\s*Depends:\s*(linux-image-\S+-{flavour})\s*$", q.stdout, re.M)
        if names:
            return str(names[0])
        if attempt == 0 and os.geteuid() == 0:
            log("apt-get update (no package lists for the kernel yet)")
            run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
    raise SystemExit(f"build-guest: cannot resolve {meta}'s kernel; run `apt-get update`")


def download(package: str, debs: Path) -> Path:
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    debs.mkdir(parents=True, exist_ok=True)
    log(f"apt-get download {package}")
    argv = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        argv += ["-o", "APT::Sandbox::User=root"]  # else apt warns it cannot drop to _apt
    run([*argv, package], cwd=debs, stdout=subprocess.DEVNULL)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise SystemExit(f"build-guest: apt-get download {package} left no .deb in {debs}")
    return found[-1]


def deb_version(deb: Path) -> str:
    return run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True).stdout.strip()


def deb_members(deb: Path, want: re.Pattern[str]) -> dict[str, bytes]:
    """Regular files of the deb's data archive whose path matches `want` (path -> content)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and want.fullmatch(name):
                f = tar.extractfile(member)
                assert f is not None
                files[name] = f.read()
    if proc.wait() != 0:
        raise SystemExit(f"build-guest: dpkg-deb --fsys-tarfile {deb} failed")
    return files


def is_static_elf(data: bytes) -> bool:
    """True for an ELF64 executable without a PT_INTERP (program interpreter) header."""
    if data[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def busybox_binary(debs: Path) -> tuple[bytes, str]:
    """busybox-static's /bin/busybox: the installed one (scripts/setup), else downloaded."""
    q = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status} ${Version}", BUSYBOX_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    if q.returncode == 0 and q.stdout.startswith("install ok installed"):
        data = Path("/bin/busybox").read_bytes()
        source = f"{BUSYBOX_PACKAGE} {q.stdout.split()[-1]} (installed)"
    else:
        deb = download(BUSYBOX_PACKAGE, debs)
        data = deb_members(deb, re.compile(r"bin/busybox"))["bin/busybox"]
        source = f"{BUSYBOX_PACKAGE} {deb_version(deb)} (downloaded)"
    if not is_static_elf(data):
        raise SystemExit(f"build-guest: busybox from {source} is not statically linked")
    return data, source


# --- kernel modules --------------------------------------------------------------------------


def modinfo(ko: bytes, key: str) -> str | None:
    """A key of the module's .modinfo section (NUL-separated key=value strings)."""
    m = re.search(rb"(?:^|\0)" + re.escape(key.encode()) + rb"=([^\0]*)\0", ko)
    return m.group(1).decode() if m else None


def load_order(
    modules: dict[str, bytes], builtin: set[str], wanted: tuple[str, ...] = WANTED_MODULES
) -> list[str]:
    """`wanted` and everything they depend on (modinfo depends=), dependencies first.

    (Debian's kernel packages ship no modules.dep: depmod makes it at install time.)"""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in modules:
            raise SystemExit(f"build-guest: module {name} is neither in the package nor built in")
        if name in visiting:
            raise SystemExit(f"build-guest: dependency cycle at module {name}")
        visiting.add(name)
        deps = modinfo(modules[name], "depends") or ""
        for dep in filter(None, deps.split(",")):
            visit(dep.replace("-", "_"))
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


# --- initramfs (cpio "newc", written here so /dev/console needs no root) ---------------------


class Cpio:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        namez = name.encode() + b"\0"
        fields = (
            self.ino,
            mode,
            0,  # uid
            0,  # gid
            1,  # nlink
            0,  # mtime: 0 keeps the archive reproducible
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(namez),
            0,  # check (unused by "newc")
        )
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.buf.write(header + namez)
        self.buf.write(b"\0" * (-(len(header) + len(namez)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self.ino = 0
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def make_initramfs(busybox: bytes, modules: dict[str, bytes], order: list[str]) -> bytes:
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox, 0o755)
    c.symlink("bin/sh", "busybox")
    for name in order:
        c.file(f"lib/modules/{name}.ko", modules[name])
    c.file("lib/modules/load-order", "".join(f"{n}\n" for n in order).encode())
    c.file("init", render_init(), 0o755)
    return gzip.compress(c.finish(), compresslevel=6, mtime=0)


# --- main ------------------------------------------------------------------------------------


def recipe_hash(busybox_source: str, variant: Variant = VARIANTS["virtio"]) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(INIT.read_bytes())
    h.update(busybox_source.encode())
    if variant != VARIANTS["virtio"]:
        h.update(repr(variant).encode())
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o644)  # QEMU may run as another user
        f.write(data)
    os.replace(tmp, path)


def build(out: Path, refresh: bool, variant: Variant = VARIANTS["virtio"]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs building at once take turns
        return build_locked(out, refresh, variant)


def build_locked(out: Path, refresh: bool, variant: Variant) -> tuple[Path, Path]:
    vmlinuz, initrd, stamp = out / "vmlinuz", out / "initramfs.cpio.gz", out / "guest.json"
    debs = out / "debs"
    old = json.loads(stamp.read_text()) if stamp.exists() else {}

    busybox, busybox_source = busybox_binary(debs)
    recipe = recipe_hash(busybox_source, variant)
    if not refresh and old.get("recipe") == recipe and vmlinuz.exists() and initrd.exists():
        return vmlinuz, initrd

    package = old.get("kernel_package") if not refresh else None
    if not package or not any(debs.glob(f"{package}_*.deb")):
        package = resolve_kernel_package(variant)
    deb = download(package, debs)
    for stale in debs.glob("linux-image-*.deb"):
        if stale != deb:
            stale.unlink()
    log(f"unpacking {deb.name}")
    files = deb_members(
        deb, re.compile(r"boot/vmlinuz-.*|lib/modules/[^/]+/(modules\.builtin|kernel/.*\.ko)")
    )
    kernels = [n for n in files if n.startswith("boot/vmlinuz-")]
    if len(kernels) != 1:
        raise SystemExit(f"build-guest: expected one boot/vmlinuz-* in {deb.name}, got {kernels}")
    release = kernels[0].removeprefix("boot/vmlinuz-")
    builtin_list = files.get(f"lib/modules/{release}/modules.builtin", b"").decode()
    builtin = {Path(p).name.removesuffix(".ko").replace("-", "_") for p in builtin_list.split()}
    modules = {
        Path(n).name.removesuffix(".ko").replace("-", "_"): data
        for n, data in files.items()
        if n.endswith(".ko")
    }
    order = load_order(modules, builtin, variant.modules)

    write_atomic(vmlinuz, files[kernels[0]])
    write_atomic(initrd, make_initramfs(busybox, modules, order))
    info = {
        "recipe": recipe,
        "variant": next(name for name, v in VARIANTS.items() if v == variant),
        "kernel_package": package,
        "kernel_version": deb_version(deb),
        "kernel_release": release,
        "busybox": busybox_source,
        "modules": order,
        "marker": MARKER,
        "fs_kib": FS_KIB,
        "raw_offset": RAW_OFFSET,
        "min_disk": MIN_DISK,
    }
    write_atomic(stamp, (json.dumps(info, indent=2) + "\n").encode())
    log(f"built {release} guest in {out} (modules: {' '.join(order)})")
    return vmlinuz, initrd


def main() -> None:
    p = argparse.ArgumentParser(
        prog="scripts/build-guest",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default="virtio",
        help="virtio: cloud kernel + virtio-blk (the disk tests); usb: generic kernel + xhci, "
        "usb-storage, sd, ext4 (the USB tests). Default: %(default)s",
    )
    p.add_argument(
        "--dir",
        help="cache/output directory (default: $VMSHIELD_GUEST_DIR for virtio, else "
        "<repo>/var/guest, <repo>/var/guest-usb for usb)",
    )
    p.add_argument(
        "--refresh",
        action="store_true",
        help="re-resolve the kernel package and rebuild even if the cache is current",
    )
    args = p.parse_args()
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query"):
        if not shutil.which(tool):
            raise SystemExit(f"build-guest: {tool} not found (this builder needs Debian's tools)")
    variant = VARIANTS[args.variant]
    default = ROOT / "var" / variant.cache
    if args.variant == "virtio" and os.environ.get("VMSHIELD_GUEST_DIR"):
        default = Path(os.environ["VMSHIELD_GUEST_DIR"])
    out = Path(args.dir) if args.dir else default
    vmlinuz, initrd = build(out.resolve(), args.refresh, variant)
    print(f"VMLINUZ={vmlinuz}")
    print(f"INITRD={initrd}")


if __name__ == "__main__":
    main()
