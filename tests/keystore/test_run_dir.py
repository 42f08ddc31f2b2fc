"""Issue 12 finding 4: the run directory of `disk serve` cannot be taken over by another
local user (a second user is created for the test; the attacker is root or that user)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystore.services import nbdproc
from tests.support import ROOT

VICTIM = "vmshield-t2"

#: run as the victim: a keystore with one disk, then `disk serve` with the default socket
SCRIPT = r"""
import json, os, sys
from argon2 import PasswordHasher
from click.testing import CliRunner
from keystore.auth import AuthPolicy
from keystore.sqlite import repository as sr
sr.AuthPolicy = lambda: AuthPolicy(hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
from keystore.cli import main
pwf = sys.argv[1]
def v(*args):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output
for args in (["init"], ["user", "add", "alice", "--password-file", pwf],
             ["vm", "add", "web1", "--owner", "alice"],
             ["disk", "create", "web1", "--size", "1M", "--format", "luks1",
              "--pbkdf-iterations", "1000", "--password-file", pwf]):
    code, out = v(*args)
    assert code == 0, (args, out)
code, out = v("disk", "serve", "web1-0", "--password-file", pwf, "--json")
print(json.dumps({"code": code, "output": out}))
"""


@pytest.fixture(scope="module")
def victim() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second local user")
    try:
        return pwd.getpwnam(VICTIM)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", VICTIM], check=True)
        return pwd.getpwnam(VICTIM)


@pytest.fixture
def home(victim: pwd.struct_passwd) -> Iterator[Path]:
    """A directory of the victim's, with a precious file in it."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="vms-victim-"))
    os.chmod(d, 0o700)
    os.chown(d, victim.pw_uid, victim.pw_gid)
    (d / "pw").write_bytes(b"s3cret-horse-battery")
    (d / "precious").write_bytes(b"the victim's data\n")
    for f in ("pw", "precious"):
        os.chown(d / f, victim.pw_uid, victim.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _serve_as(victim: pwd.struct_passwd, home: Path, xdg: Path | None) -> dict[str, object]:
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "VMSHIELD_DB": str(home / "ks.db")}
    if xdg is not None:
        env["XDG_RUNTIME_DIR"] = str(xdg)
    r = subprocess.run(
        ["runuser", "-u", victim.pw_name, "--", sys.executable, "-c", SCRIPT, str(home / "pw")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    with contextlib.suppress(ValueError, KeyError, TypeError, ProcessLookupError):
        os.kill(int(json.loads(str(result["output"]))["pid"]), signal.SIGTERM)  # a server ran
    return result


def test_the_tmp_fallback_is_gone(victim: pwd.struct_passwd, home: Path) -> None:
    # the attacker takes the old fallback name first, with the victim's log name pointing
    # at the victim's file
    planted = Path(f"/tmp/vmshield-{victim.pw_uid}")
    shutil.rmtree(planted, ignore_errors=True)
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    (planted / "web1-0.log").symlink_to(home / "precious")
    try:
        result = _serve_as(victim, home, xdg=None)
    finally:
        shutil.rmtree(planted, ignore_errors=True)
    assert result["code"] == 1 and "XDG_RUNTIME_DIR" in str(result["output"])
    assert (home / "precious").read_bytes() == b"the victim's data\n"


def test_a_run_dir_of_another_owner_is_refused(victim: pwd.struct_passwd, home: Path) -> None:
    xdg = Path(tempfile.mkdtemp(dir="/tmp", prefix="vms-xdg-"))
    xdg.chmod(0o755)  # the victim's runtime dir, but `vmshield` inside is the attacker's
    (xdg / "vmshield").mkdir(mode=0o777)
    (xdg / "vmshield").chmod(0o777)
    (xdg / "vmshield" / "web1-0.log").symlink_to(home / "precious")
    try:
        result = _serve_as(victim, home, xdg=xdg)
    finally:
        shutil.rmtree(xdg, ignore_errors=True)
    assert result["code"] == 1, result
    assert "belongs to uid 0, not to you" in str(result["output"])
    assert (home / "precious").read_bytes() == b"the victim's data\n"


def test_a_group_writable_socket_dir_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    d.chmod(0o770)
    with pytest.raises(Exception, match="writable by others"):
        nbdproc.start(
            tmp_path / "none.img", b"pw", nbdproc.ServerFiles(d / "x.sock"), readonly=True
        )


def test_a_planted_log_symlink_is_not_followed(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me\n")
    (d / "x.log").symlink_to(precious)
    (d / "x.pid").symlink_to(precious)
    with pytest.raises(nbdproc.ServeError):
        nbdproc.start(
            tmp_path / "none.img", b"pw", nbdproc.ServerFiles(d / "x.sock"), readonly=True
        )
    assert precious.read_bytes() == b"keep me\n"
    assert not (d / "x.log").is_symlink()
