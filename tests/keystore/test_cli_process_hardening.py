"""The `vmshield` command, while it holds a passphrase, cannot dump core, cannot be ptraced by
its user's other processes, and keeps its memory out of swap (keystore.cli.run, the console
script's entry point).

The command waits for the passphrase on stdin, which is when the tests look. Run as an
unprivileged user, the kernel's answer shows in /proc: a dumpable process's /proc/PID/status
belongs to its user, a non-dumpable one's to root; such a user cannot lock its memory, and
the command says so once. Run as root, every resident page is locked (VmLck >= VmRSS).
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nbd_plugin import luks
from nbd_plugin.serve.hardening import can_lock_memory
from tests.support import ROOT
from tests.support.libvirt import processes
from tests.support.procs import (
    core_limits,
    status_kib,
    unlimited_core,
    unlocked_mappings,
    wait_reading_stdin,
)

USER = "nobody"
SECRET = b"correct horse battery staple"
LOGIN_MEMLOCK = 8 << 20
"""RLIMIT_MEMLOCK as a login session gives it to an unprivileged user (8 MiB)."""

CAN_LOCK = pytest.mark.skipif(
    not can_lock_memory(), reason="this root has no CAP_IPC_LOCK (a container): nothing locks"
)
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv, /proc/PID/syscall)")


@contextmanager
def _waiting_command(
    argv_prefix: list[str], preexec: Callable[[], None]
) -> Iterator[subprocess.Popen[bytes]]:
    """`vmshield image test-passphrase` on a new image, started with ``argv_prefix`` (setpriv
    or nothing), once it waits for the passphrase on stdin."""
    work = Path(tempfile.mkdtemp(prefix="vmsc", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        image = work / "disk.img"
        luks.create_image(str(image), 1 << 20, SECRET, iterations=1000)
        os.chmod(image, 0o644)
        proc = subprocess.Popen(
            [*argv_prefix, str(ROOT / ".venv" / "bin" / "vmshield"), "image",
             "test-passphrase", str(image)],
            cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={"PATH": os.environ["PATH"], "HOME": str(work)}, preexec_fn=preexec,
        )  # fmt: skip
        try:
            wait_reading_stdin(proc)  # the passphrase
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _answer(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    out, err = proc.communicate(SECRET + b"\n", timeout=60)
    assert proc.returncode == 0, err
    assert b"opens" in out
    return out, err


def _as_a_user() -> None:
    """A shell of an unprivileged user: `ulimit -c unlimited`, and its login's memlock."""
    unlimited_core()
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (LOGIN_MEMLOCK, LOGIN_MEMLOCK))


@ROOT_ONLY
def test_the_command_holding_a_passphrase_is_not_dumpable() -> None:
    nobody = pwd.getpwnam(USER)
    setpriv = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
               "--clear-groups"]  # fmt: skip
    with _waiting_command(setpriv, _as_a_user) as proc:
        status = Path(f"/proc/{proc.pid}/status")
        lines = status.read_text().splitlines()
        assert int(next(x for x in lines if x.startswith("Uid:")).split()[1]) == nobody.pw_uid
        # the kernel hands /proc/PID of a non-dumpable process to root
        assert status.stat().st_uid == 0, "the command stayed dumpable"
        assert core_limits(proc.pid) == ("0", "0")
        _, err = _answer(proc)
    # it cannot lock its memory, and says so once, before the secret is read
    warnings = [x for x in err.decode().splitlines() if "warning" in x]
    assert len(warnings) == 1, err
    assert "memory not locked: RLIMIT_MEMLOCK is 8388608 bytes" in warnings[0], err
    assert "locking needs CAP_IPC_LOCK (root) or an unlimited RLIMIT_MEMLOCK" in warnings[0]


@ROOT_ONLY
@CAN_LOCK
def test_the_command_run_by_root_keeps_its_memory_out_of_swap() -> None:
    def root_shell() -> None:  # root's limits: no memlock limit counts with CAP_IPC_LOCK
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (LOGIN_MEMLOCK, LOGIN_MEMLOCK))

    with _waiting_command([], root_shell) as proc:
        assert status_kib(proc.pid, "VmLck") > 0
        # every mapping, also those made after the lock (the modules imported since): a
        # lock of the current pages alone (no MCL_FUTURE) leaves most of them out
        assert unlocked_mappings(proc.pid) == []
        _, err = _answer(proc)
    assert b"warning" not in err, err


def test_a_command_reading_two_secrets_says_once_that_its_memory_is_not_locked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from keystore.cli import options

    current, new = tmp_path / "current", tmp_path / "new"
    current.write_bytes(b"old secret")
    new.write_bytes(b"new secret")
    monkeypatch.setattr(options, "_unlocked", None)  # whatever happens, put back after
    options.memory_not_locked("RLIMIT_MEMLOCK is 1 bytes and no CAP_IPC_LOCK")
    reader = options.SecretReader(noun="passphrase")
    assert reader.read("passphrase", file=current) == b"old secret"
    assert reader.read("new passphrase", file=new) == b"new secret"
    err = capsys.readouterr().err
    assert err.count("warning: memory not locked: RLIMIT_MEMLOCK is 1 bytes") == 1, err


def test_a_restore_which_reads_no_prompt_still_says_its_memory_is_not_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`disk serve --restore` (and --unattended, unenroll-host, rebind) recover secrets from
    the keyring, the host key or a clevis token, not from a reader: they say it too."""
    from click.testing import CliRunner

    from keystore.cli import main, options

    db = tmp_path / "ks.db"
    assert CliRunner().invoke(main, ["--db", str(db), "init"]).exit_code == 0
    monkeypatch.setattr(options, "_unlocked", None)
    options.memory_not_locked("RLIMIT_MEMLOCK is 1 bytes and no CAP_IPC_LOCK")
    run_dir = tmp_path / "run"
    try:  # a restore starts the host disk server if none runs: stopped again here
        r = CliRunner().invoke(
            main, ["--db", str(db), "disk", "serve", "--restore", "--run-dir", str(run_dir)]
        )
    finally:
        for pid in processes(str(run_dir)):
            os.kill(pid, signal.SIGTERM)
    assert r.exit_code == 0, r.output
    assert r.output.count("warning: memory not locked: RLIMIT_MEMLOCK is 1 bytes") == 1, r.output
    assert "nothing to restore" in r.output
