"""The `vmshield` command cannot dump core, and its user's other processes cannot ptrace it,
while it holds a passphrase (keystore.cli.run, the console script's entry point).

The command runs as an unprivileged user, so the kernel's answer shows in /proc: a dumpable
process's /proc/PID/status belongs to its user, a non-dumpable one's to root. It waits for
the passphrase on stdin, which is when the test looks.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from nbd_plugin import luks
from tests.support import ROOT
from tests.support.procs import core_limits, unlimited_core

USER = "nobody"
SECRET = b"correct horse battery staple"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as another user")
def test_the_command_holding_a_passphrase_is_not_dumpable() -> None:
    nobody = pwd.getpwnam(USER)
    work = Path(tempfile.mkdtemp(prefix="vmsc", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        image = work / "disk.img"
        luks.create_image(str(image), 1 << 20, SECRET, iterations=1000)
        os.chmod(image, 0o644)
        proc = subprocess.Popen(
            [
                "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                "--clear-groups", str(ROOT / ".venv" / "bin" / "vmshield"),
                "image", "test-passphrase", str(image),
            ],
            cwd=work,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ["PATH"], "HOME": str(work)},
            preexec_fn=unlimited_core,  # what a shell with `ulimit -c unlimited` passes on
        )  # fmt: skip
        assert proc.stdin is not None
        try:
            status = Path(f"/proc/{proc.pid}/status")
            deadline = time.monotonic() + 60
            # setpriv execs the command in place: once the kernel hands /proc/PID to root
            # while the uid is nobody's, the command has made itself non-dumpable
            while True:
                assert proc.poll() is None, proc.communicate()
                lines = status.read_text().splitlines()
                uid = int(next(x for x in lines if x.startswith("Uid:")).split()[1])
                if uid == nobody.pw_uid and status.stat().st_uid == 0:
                    break
                assert time.monotonic() < deadline, "the command stayed dumpable"
                time.sleep(0.05)
            assert core_limits(proc.pid) == ("0", "0")
            out, err = proc.communicate(SECRET + b"\n", timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert b"opens" in out
        assert b"warning" not in err
    finally:
        shutil.rmtree(work, ignore_errors=True)
