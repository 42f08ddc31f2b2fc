"""Issue 12 #14: the server holding the master key cannot dump core and is not dumpable.

nbdkit runs as an unprivileged user here: for a dumpable process /proc/PID/status belongs to
that user, for a non-dumpable one the kernel makes it root's, which is what the test reads.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nbd_plugin import luks
from tests.support.nbd import PLUGIN, ROOT, SECRET, read_at, write_secret
from tests.support.procs import core_limits, mapped_kib, status_kib, unlimited_core

USER = "nobody"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start nbdkit as another user")
def test_running_server_is_not_dumpable_and_has_no_core_limit() -> None:
    nobody = pwd.getpwnam(USER)
    work = Path(tempfile.mkdtemp(prefix="vmsh", dir="/tmp"))
    try:
        os.chown(work, nobody.pw_uid, nobody.pw_gid)
        image, key, sock = work / "disk.img", work / "key", work / "s.sock"
        luks.create_image(str(image), 4 << 20, SECRET, iterations=1000)
        write_secret(key, SECRET)
        for p in (image, key):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        pidfile = work / "pid"
        proc = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={nobody.pw_uid}",
                f"--regid={nobody.pw_gid}",
                "--clear-groups",
                "nbdkit",
                "-f",
                "--exit-with-parent",
                "-U",
                str(sock),
                "-P",
                str(pidfile),
                "python",
                PLUGIN,
                f"image={image}",
                f"passphrase=+{key}",
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=unlimited_core,  # what a shell with `ulimit -c unlimited` would pass on
        )
        try:
            deadline = time.monotonic() + 20
            while not (pidfile.exists() and pidfile.stat().st_size):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "nbdkit did not start"
                time.sleep(0.05)
            pid = int(pidfile.read_text())
            assert read_at(str(sock), 4096) == bytes(4096)  # it serves
            status = Path(f"/proc/{pid}/status")
            uid_line = next(x for x in status.read_text().splitlines() if x.startswith("Uid:"))
            assert int(uid_line.split()[1]) == nobody.pw_uid
            # non-dumpable: the kernel hands /proc/PID/* to root instead of the process's user
            assert status.stat().st_uid == 0
            assert core_limits(pid) == ("0", "0")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_systemd_unit_forbids_core_dumps() -> None:
    unit = (ROOT / "scripts" / "systemd" / "vmshield-disk@.service").read_text()
    assert "\nLimitCORE=0\n" in unit


def test_a_forked_server_keeps_its_memory_locked(tmp_path: Path, sockdir: Path) -> None:
    """Issue 20 B7: mlock does not survive nbdkit's fork into the background; the serving
    process itself must lock its pages (VmLck was 0: the master key could be swapped out)."""
    image, key = tmp_path / "disk.img", tmp_path / "key"
    luks.create_image(str(image), 4 << 20, SECRET, iterations=1000)
    write_secret(key, SECRET)
    sock, pidfile = sockdir / "s.sock", sockdir / "s.pid"
    subprocess.run(  # no -f: nbdkit forks, the parent returns once it is ready
        ["nbdkit", "-U", str(sock), "-P", str(pidfile), "python", PLUGIN, f"image={image}",
         f"passphrase=+{key}"],
        cwd=ROOT, check=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    pid = int(pidfile.read_text())
    try:
        assert read_at(str(sock), 4096) == bytes(4096)  # it serves
        # once the kernels are loaded its reads decrypt from the mapped image, whose pages
        # are the kernel's cache of the file and stay unlocked (crypto/mapped.py): all the
        # rest is locked
        with image.open("r+b") as f:  # ciphertext, not holes: the reads touch the mapping
            f.seek(image.stat().st_size - (1 << 20))
            f.write(os.urandom(1 << 20))
        deadline = time.monotonic() + 120
        while not mapped_kib(pid, image) and time.monotonic() < deadline:
            read_at(str(sock), 1 << 20, 3 << 20)
            time.sleep(0.2)
        image_pages = mapped_kib(pid, image)
        assert image_pages > 0, "the reads never came from the mapping"
        locked, resident = status_kib(pid, "VmLck"), status_kib(pid, "VmRSS")
        assert locked >= resident - image_pages > 0, (locked, resident, image_pages)
    finally:
        os.kill(pid, 15)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_root_of_a_user_namespace_does_not_lock_under_a_finite_limit() -> None:
    """Root inside a user namespace (rootless podman) has CAP_IPC_LOCK in CapEff, but the
    kernel only honours it in the initial namespace: a finite RLIMIT_MEMLOCK still applies.
    Locking under MCL_FUTURE there succeeded while the process was small and then made a
    later large allocation (an Argon2 keyslot's memory) fail; it must not lock and say why."""
    try:
        unshare = subprocess.run(["unshare", "--user", "--map-root-user", "true"],
                                 check=False, timeout=30).returncode  # fmt: skip
    except OSError:
        unshare = -1
    if unshare != 0:
        pytest.skip("no user namespaces here (unshare --user)")
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    # large enough that a lock would succeed and the later allocation fail, where this
    # process may raise its limit; else its own (8 MiB here: the lock then fails at once)
    limit = 512 << 20 if hard == resource.RLIM_INFINITY else min(hard, 512 << 20)
    code = (
        "from nbd_plugin.serve.hardening import lock_all_memory\n"
        "print(lock_all_memory())\n"
        "import mmap\n"  # more than the limit, untouched: refused if locked (MCL_FUTURE)
        "print('allocated', len(mmap.mmap(-1, 600 << 20)))\n"
    )

    def finite_memlock() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))

    out = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", code],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        preexec_fn=finite_memlock,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    said, allocated = out.stdout.splitlines()
    assert (
        said == f"RLIMIT_MEMLOCK is {limit} bytes and no CAP_IPC_LOCK in the initial user namespace"
    )
    assert allocated == f"allocated {600 << 20}"
