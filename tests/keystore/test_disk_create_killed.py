"""A `disk create` killed by SIGKILL (issue 26 item 3): its `creating` record, partial image
and marker stay behind, and the next command that meets them finishes the undo.

The installed `vmshield` is killed at points found by watching what it has made: while it
checks the owner's password (marker only) and while the image's keyslot is derived (a
partial image); the state between them (recorded, no image yet: too short a window to hit
from outside) is that of the second kill with the image removed. Then `disk list`
removes what is left, says so in one line, and the same create runs again.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keystore.sqlite import repository as sqlite_repo
from tests.keystore.test_cli_disk_serve import PW, inproc
from tests.support.cli import FAST

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
DISK = "db1-0"


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A keystore whose user bob has a real (slow) verifier: a create checks it for ~1 s."""
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    path = tmp_path / "ks.db"
    inproc(path, "init")
    _vms(path, "user", "add", "bob", secret=PW)  # the real policy: a subprocess
    inproc(path, "vm", "add", "db1", "--owner", "bob")
    return path


def _vms(db: Path, *args: str, secret: bytes | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [VMSHIELD, *args], input=None if secret is None else (secret + b"\n").decode(),
        capture_output=True, text=True, env={**os.environ, "VMSHIELD_DB": str(db)}, timeout=120,
        check=False,
    )  # fmt: skip
    assert p.returncode == 0, (p.stdout, p.stderr)
    return p


def _state(db: Path) -> str | None:
    """The disk's state in the keystore, None without a record (read-only, as a bystander)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            row = c.execute("SELECT state FROM disks WHERE name = ?", (DISK,)).fetchone()
    except sqlite3.OperationalError:
        return None
    return None if row is None else str(row[0])


def _start_create(db: Path, iter_time_ms: int = 500) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [VMSHIELD, "disk", "create", "db1", "--size", "8M", "--format", "luks1",
         "--iter-time", str(iter_time_ms)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "VMSHIELD_DB": str(db)},
    )  # fmt: skip
    assert p.stdin is not None
    p.stdin.write(PW + b"\n")
    p.stdin.close()
    return p


def _wait_for(p: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        assert p.poll() is None and time.monotonic() < deadline, "create ended first"
        time.sleep(0.002)


def _paths(db: Path) -> tuple[Path, Path]:
    return db.parent / "disks" / f"{DISK}.img", db.parent / "creating" / f"{DISK}.json"


@pytest.mark.parametrize("point", ["logging in", "recorded", "writing the image"])
def test_the_next_command_finishes_a_killed_create(db: Path, point: str) -> None:
    image, marker = _paths(db)
    p = _start_create(db)
    if point == "logging in":
        _wait_for(p, lambda: marker.exists() and _state(db) is None)
    else:
        _wait_for(p, image.exists)
    p.kill()
    p.wait(timeout=30)
    if point == "recorded":
        # killed between recording the disk and making its image: that window is too short
        # to hit from outside, so its state is made from a later kill
        image.unlink()
    assert marker.exists()
    assert _state(db) == (None if point == "logging in" else "creating")
    r = _vms(db, "disk", "list", "--json")
    assert json.loads(r.stdout) == []
    assert not image.exists() and not marker.exists()
    if point == "logging in":
        assert r.stderr == ""  # nothing was recorded, nothing to say
    else:
        made = "its partial image" if point == "writing the image" else "no image had been"
        [note] = r.stderr.splitlines()
        assert note.startswith(f"note: disk {DISK}: its `disk create` (pid {p.pid}) was killed")
        assert made in note, note
        audit = json.loads(_vms(db, "audit", "--json", "--action", "disk.create.*").stdout)
        assert [(a["action"], a["detail"]["creator_pid"]) for a in audit] == [
            ("disk.create.abandoned", p.pid)]  # fmt: skip
    _vms(db, "disk", "create", "db1", "--size", "8M", "--pbkdf-iterations", "1000", secret=PW)
    assert _state(db) == "ready"


def test_a_running_create_is_left_alone_and_completes(db: Path) -> None:
    image, marker = _paths(db)
    p = _start_create(db, iter_time_ms=3000)  # still deriving while `disk list` runs
    _wait_for(p, image.exists)
    listed = json.loads(_vms(db, "disk", "list", "--json").stdout)
    assert [(d["name"], d["state"]) for d in listed] == [(DISK, "creating")]
    assert p.wait(timeout=120) == 0
    assert _state(db) == "ready" and image.exists() and not marker.exists()


def test_without_a_marker_it_says_what_to_run(db: Path) -> None:
    """A `creating` record no process on this host claims (another host's create on a
    shared keystore, an older vmshield): untouched, with the commands to run."""
    image, marker = _paths(db)
    p = _start_create(db)
    _wait_for(p, image.exists)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    marker.unlink()
    r = _vms(db, "disk", "list", "--json")
    assert [d["state"] for d in json.loads(r.stdout)] == ["creating"] and image.exists()
    assert r.stderr.splitlines() == [
        f"note: disk {DISK} is `creating` but no `disk create` on this host is making it: "
        f"if none runs elsewhere, run `rm -f {image}` (the partial image, if any) and "
        f"`vmshield disk forget {DISK} --yes`"
    ]


def test_a_marker_left_after_the_disk_was_ready_is_dropped(db: Path) -> None:
    image, marker = _paths(db)
    _vms(db, "disk", "create", "db1", "--size", "8M", "--pbkdf-iterations", "1000", secret=PW)
    # killed between `ready` and removing its marker: a pid above pid_max is no process
    marker.write_text(json.dumps({"pid": 2**22 + 1, "start": "gone", "path": str(image)}))
    r = _vms(db, "disk", "list", "--json")
    assert r.stderr == "" and not marker.exists()
    assert [d["state"] for d in json.loads(r.stdout)] == ["ready"] and image.exists()
