"""An interrupted or failed `disk create` removes what it made (issue 26 items 3 and 4).

The installed `vmshield` runs as a subprocess and is stopped by real signals at several
points (the password prompt, the image being written) or fails for real (a size ext4
cannot hold); afterwards there is no record, no file, one line on stderr, and the same
command runs again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keystore.sqlite import repository as sqlite_repo
from tests.keystore.test_cli_disk_serve import PW, inproc
from tests.support.cli import FAST

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
FASTKDF = ("--pbkdf-iterations", "1000")


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    path = tmp_path / "ks.db"
    inproc(path, "init")
    inproc(path, "user", "add", "alice", secret=PW + b"\n")
    inproc(path, "vm", "add", "web1", "--owner", "alice")
    return path


def _env(db: Path) -> dict[str, str]:
    return {**os.environ, "VMSHIELD_DB": str(db)}


def _run(db: Path, *args: str, code: int, secret: bytes | None = PW) -> str:
    p = subprocess.run(
        [VMSHIELD, *args],
        input=None if secret is None else secret + b"\n",
        capture_output=True,
        env=_env(db),
        timeout=120,
        check=False,
    )
    assert p.returncode == code, (p.stdout, p.stderr)
    return p.stderr.decode()


def _nothing_left(db: Path) -> None:
    listed = json.loads(_run(db, "disk", "list", "--json", code=0, secret=None) or "[]")
    assert listed == []
    out = subprocess.run(
        [VMSHIELD, "disk", "list", "--json"], capture_output=True, env=_env(db), check=True
    )
    assert json.loads(out.stdout) == []
    disks = db.parent / "disks"
    assert not disks.exists() or list(disks.iterdir()) == []


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if not line.startswith("size: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_too_large_for_ext4_is_one_line_with_the_limit(db: Path, tmp_path: Path) -> None:
    line = _error_line(_run(db, "disk", "create", "web1", "--size", "100T", *FASTKDF, code=1))
    image = db.parent / "disks" / "web1-0.img"
    assert line.startswith(f"Error: cannot create {image}: 100 TiB is more than")
    assert "at most 16" in line and "TiB" in line
    _nothing_left(db)
    audit = json.loads(
        subprocess.run(
            [VMSHIELD, "audit", "--json"], capture_output=True, env=_env(db), check=True
        ).stdout
    )
    assert audit[-2]["action"] == "disk.create.undone" and "100 TiB" in audit[-2]["detail"]["error"]
    loose = tmp_path / "loose.img"
    line = _error_line(
        _run(db, "image", "create", str(loose), "--size", "100T", *FASTKDF, code=1, secret=PW)
    )
    assert line.startswith(f"Error: cannot create {loose}: 100 TiB") and "at most 16" in line
    assert not loose.exists()
    _run(db, "disk", "create", "web1", "--size", "8M", *FASTKDF, code=0)  # the name is free


def _start_create(db: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [VMSHIELD, "disk", "create", "web1", "--size", "64M", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(db),
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_the_image_is_written_removes_it(db: Path, sig: int) -> None:
    p = _start_create(db, "--format", "luks1", "--iter-time", "2000")
    assert p.stdin is not None
    p.stdin.write(PW + b"\n")
    p.stdin.close()
    image = db.parent / "disks" / "web1-0.img"
    deadline = time.monotonic() + 60
    while not image.exists():  # the key derivation of the keyslot is running now
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(sig)
    assert p.stderr is not None
    err = p.stderr.read()
    assert p.wait(timeout=120) == 128 + sig, err
    line = _error_line(err.decode())
    assert f"interrupted by {signal.Signals(sig).name}" in line
    assert "nothing was left behind" in line
    _nothing_left(db)
    _run(db, "disk", "create", "web1", "--size", "8M", *FASTKDF, code=0)


def test_ctrl_c_at_the_password_prompt_exits_130(db: Path) -> None:
    p = _start_create(db, *FASTKDF)
    assert p.stderr is not None
    assert p.stderr.readline().startswith(b"size: ")  # it waits for the password now
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and b"interrupted" in err and b"Traceback" not in err
    _nothing_left(db)
