"""The Debian package (scripts/package) in a clean Debian root, through its whole life.

A bookworm root made by mmdebstrap (cached as a tarball for the run's later tests and the next
runs), the package installed with apt from nothing but Debian's archive and the .deb, then:
`vmshield doctor`, init, a user, a VM, `disk create`, `disk serve` and plaintext written and
read back with nbdcopy through the socket; an upgrade to a package rebuilt with a bumped
version, with the server still running; remove and purge, which keep the keystore and the disk.
Nothing of the checkout is visible inside the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# building two packages and a Debian root takes minutes on a loaded machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
CACHE = Path("/var/cache/vmshield-tests")
PW = "correct-horse-battery-staple-42"
V1 = "0.1.0"
V2 = "0.1.0+test1"
#: the test rig: the checkout's tests/ and scripts/, and the lock's test tools
RIG_TOPS = {
    "tests",
    "scripts",
    "conftest.py",
    "pytest",
    "_pytest",
    "hypothesis",
    "mypy",
    "ruff",
    "importlinter",
    "import_linter",
    "grimp",
    "setuptools",
    "pytest_timeout",
    "iniconfig",
    "pluggy",
}


def _mirror() -> str:
    for line in SOURCES.read_text().splitlines():
        if line.startswith("URIs:"):
            return line.split()[1]
    raise AssertionError(f"no URIs: in {SOURCES}")


def root_tarball() -> Path:
    """A clean bookworm root (mmdebstrap --variant=apt), made once and kept in CACHE."""
    mirror = _mirror()
    key = hashlib.sha256(f"bookworm apt ca-certificates {mirror}".encode()).hexdigest()[:12]
    tar = CACHE / f"bookworm-apt-{key}.tar"
    if not tar.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        part = tar.with_name(tar.name + ".part")  # renamed once whole
        subprocess.run(
            [
                "mmdebstrap",
                "--quiet",
                "--format=tar",  # a name not ending in .tar would make a directory
                "--variant=apt",
                "--include=ca-certificates",
                "bookworm",
                str(part),
                mirror,
            ],
            check=True,
        )
        part.rename(tar)
    return tar


def build(out: Path, version: str) -> Path:
    # gzip: xz takes minutes on 270 MB of libraries (the contents are the same); lintian
    # refuses zstd members
    subprocess.run(
        [
            str(REPO / "scripts/package"),
            "--version",
            version,
            "--out",
            str(out),
            "--compress",
            "gzip",
        ],
        check=True,
        cwd=REPO,
    )
    deb = out / f"vmshield_{version}_amd64.deb"
    assert deb.is_file()
    return deb


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("debs")
    return build(out, V1), build(out, V2)


class Chroot:
    """A Debian root with /proc, /sys, /dev and /dev/pts of the host bound into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounts: list[Path] = []

    def mount(self) -> None:
        for fs in ("proc", "sys", "dev", "dev/pts"):
            target = self.path / fs
            target.mkdir(exist_ok=True)
            subprocess.run(["mount", "--bind", f"/{fs}", str(target)], check=True)
            self.mounts.append(target)

    def unmount(self) -> None:
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(target)], check=False)
        self.mounts.clear()

    def run(
        self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
        }
        done = subprocess.run(
            ["chroot", str(self.path), *argv],
            input=input,
            text=True,
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def install(self, deb: Path) -> subprocess.CompletedProcess[str]:
        shutil.copy(deb, self.path / "tmp" / deb.name)
        return self.run(
            "apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{deb.name}"
        )


@pytest.fixture
def chroot(tmp_path: Path) -> Iterator[Chroot]:
    path = tmp_path / "root"
    path.mkdir()
    subprocess.run(["tar", "-xf", str(root_tarball()), "-C", str(path)], check=True)
    shutil.copy(SOURCES, path / "etc/apt/sources.list.d/debian.sources")
    shutil.copy("/etc/resolv.conf", path / "etc/resolv.conf")
    # no service of a dependency starts inside the root
    policy = path / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    root = Chroot(path)
    root.mount()
    try:
        root.run("apt-get", "update", "-q")
        yield root
    finally:
        with contextlib.suppress(Exception):
            root.run(
                "sh", "-c", "for p in /run/vmshield/*.pid; do kill $(cat $p); done", check=False
            )
        root.unmount()


def test_the_package_holds_the_product_and_no_test_rig(debs: tuple[Path, Path]) -> None:
    deb, _ = debs
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split()[-1].lstrip(".") for line in listing.splitlines()]
    lib = "/usr/lib/vmshield/lib/"
    tops = {n[len(lib) :].split("/")[0] for n in names if n.startswith(lib)}
    tops = {t.split("-")[0].lower() if t.endswith(".dist-info") else t for t in tops}
    assert not tops & RIG_TOPS, tops & RIG_TOPS
    assert not [n for n in names if "/tests/" in n or n.endswith("conftest.py")]
    for wanted in (
        "/usr/bin/vmshield",
        "/usr/bin/usbgate",
        "/usr/lib/vmshield/plugin.py",
        "/usr/lib/vmshield/lib/nbd_plugin/plugin.py",
        "/usr/lib/vmshield/lib/numba/__init__.py",
        "/lib/systemd/system/vmshield-disk@.service",
        "/lib/systemd/system/usbgate@.service",
        "/lib/systemd/system/usbgate-host.service",
        "/etc/vmshield/disks/README",
        "/usr/share/man/man1/vmshield.1.gz",
        "/usr/share/man/man1/usbgate.1.gz",
        "/usr/share/bash-completion/completions/vmshield",
        "/usr/share/doc/vmshield/changelog.gz",
        "/usr/share/doc/vmshield/copyright",
    ):
        assert wanted in names, wanted
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    control = subprocess.run(
        ["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    assert f"Version: {V1}\n" in control
    depends = next(line for line in control.splitlines() if line.startswith("Depends:"))
    for dep in ("nbdkit", "nbdkit-plugin-python", "python3 (>= 3.11)", "keyutils"):
        assert dep in depends
    assert "qemu" not in depends and "libvirt" not in depends and "postgresql" not in depends


def test_the_wheel_holds_only_the_product(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("vmshield-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "keystore",
        "nbd_plugin",
        "usbgate",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert "nbd_plugin/plugin.py" in names and "keystore/cli/doctor.py" in names


def test_lintian_finds_no_error(debs: tuple[Path, Path]) -> None:
    deb, _ = debs
    done = subprocess.run(
        ["lintian", "--tag-display-limit", "0", str(deb)],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    print(done.stdout)
    errors = [line for line in done.stdout.splitlines() if line.startswith("E:")]
    assert not errors, errors
    assert done.returncode == 0, done.stdout + done.stderr


def _doctor(root: Chroot) -> dict[str, dict[str, str]]:
    done = root.run("vmshield", "doctor", "--json", "--seconds", "0.2", check=False)
    report = json.loads(done.stdout)
    assert done.returncode == report["exit_status"]
    return {c["name"]: c for c in report["checks"]}


def test_install_serve_upgrade_remove_purge(debs: tuple[Path, Path], chroot: Chroot) -> None:
    deb1, deb2 = debs
    root = chroot
    started = time.monotonic()
    root.install(deb1)
    installed_in = time.monotonic() - started
    root.run("apt-get", "install", "-y", "-q", "--no-install-recommends", "libnbd-bin")
    print(f"install of {deb1.name} with its dependencies into a clean root: {installed_in:.1f} s")
    assert not (root.path / "work").exists()  # nothing of the checkout in the root
    assert root.run("vmshield", "--version").stdout.split()[-1] == V1
    assert oct((root.path / "var/lib/vmshield").stat().st_mode & 0o777) == "0o700"

    checks = _doctor(root)
    print(json.dumps(checks, indent=1))
    assert not [c for c in checks.values() if c["status"] == "FAIL"], checks
    for name in ("nbdkit", "plugin", "data path", "keyutils"):
        assert checks[name]["status"] == "PASS", checks[name]
    assert checks["data path"]["detail"].startswith("numba")
    assert "/usr/lib/vmshield/plugin.py" in json.dumps(checks)

    root.run("vmshield", "init")
    root.run("vmshield", "user", "add", "alice", input=PW + "\n")
    root.run("vmshield", "vm", "add", "web", "--owner", "alice")
    root.run(
        "vmshield",
        "disk",
        "create",
        "web",
        "--size",
        "8M",
        "--pbkdf-iterations",
        "1000",
        input=PW + "\n",
    )
    served = json.loads(
        root.run("vmshield", "disk", "serve", "web-0", "--json", input=PW + "\n").stdout
    )
    # an export of the host disk server, started on demand (no systemd in the chroot)
    uri = served["uri"]
    assert served["export"] == "web-0" and uri.startswith("nbd+unix:///web-0?socket=")
    data = os.urandom(1 << 20)
    (root.path / "tmp/plain").write_bytes(data)
    root.run("nbdcopy", "/tmp/plain", uri)
    root.run("nbdcopy", uri, "/tmp/back")
    assert (root.path / "tmp/back").read_bytes()[: len(data)] == data
    image = root.path / "var/lib/vmshield/disks/web-0.img"
    assert data[:4096] not in image.read_bytes()  # ciphertext at rest
    assert _doctor(root)["keystore"]["status"] == "PASS"

    # the packaged hook runs from /usr/bin/python3 -I and finds the package's libraries
    root.run("vmshield", "libvirt", "install-hook")
    hook = root.run(
        "/etc/libvirt/hooks/qemu.d/vmshield",
        "other",
        "prepare",
        "begin",
        "-",
        input="<domain type='kvm'><name>other</name></domain>",
        check=False,
    )
    assert hook.returncode == 0, hook.stderr

    # upgrade with the server running: it keeps serving, the keystore and disk stay
    upgrade = root.install(deb2)
    assert root.run("vmshield", "--version").stdout.split()[-1] == V2
    root.run("nbdcopy", uri, "/tmp/back2")
    assert (root.path / "tmp/back2").read_bytes()[: len(data)] == data
    assert "web" in root.run("vmshield", "vm", "list").stdout
    assert root.run("vmshield", "audit", "verify").stdout.startswith("ok: ")
    assert "schema" not in upgrade.stderr  # same schema: nothing to run
    root.run("vmshield", "disk", "stop", "web-0")
    # the host disk server stays up serving nothing (no systemd here to stop its unit)
    host_pid = int((root.path / "run/vmshield/nbd.pid").read_text())
    os.kill(host_pid, signal.SIGTERM)

    root.run("apt-get", "remove", "-y", "-q", "vmshield")
    assert not (root.path / "usr/bin/vmshield").exists()
    assert not (root.path / "usr/lib/vmshield").exists()  # bytecode included
    assert image.is_file() and (root.path / "var/lib/vmshield/keystore.db").is_file()
    assert (root.path / "etc/vmshield/disks/README").is_file()  # conffiles stay until purge
    # the hook install-hook wrote stays (it is the admin's) but no longer stops any domain
    hook = root.run(
        "/etc/libvirt/hooks/qemu.d/vmshield",
        "other",
        "prepare",
        "begin",
        "-",
        input="<domain type='kvm'><name>other</name></domain>",
        check=False,
    )
    assert hook.returncode == 0 and "no longer" in hook.stderr, hook.stderr

    purge = root.run("dpkg", "--purge", "vmshield")
    assert "/var/lib/vmshield" in purge.stderr
    assert image.is_file() and (root.path / "var/lib/vmshield/keystore.db").is_file()
    assert not (root.path / "etc/vmshield/disks/README").exists()
