"""`vmshield user passwd` finishes or rolls back whatever stops it (issue 26 item 1).

The installed `vmshield` re-keys three real LUKS1 disks and is stopped by real signals at
several points: before the first disk is done, after one, after two (SIGINT, SIGTERM), and
by SIGKILL, which nothing can catch. After a catchable signal every disk and the keystore
verifier take the old password, and the command exits 128 + the signal; after SIGKILL the
journal lets the same command complete the change. Each disk's step is in the audit trail.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keystore.sqlite import repository as sqlite_repo
from nbd_plugin import luks
from nbd_plugin.errors import InvalidPassphrase
from tests.keystore.test_cli_disk_serve import NEW_PW, PW, inproc
from tests.support.cli import FAST

VMSHIELD = str(Path(sys.executable).parent / "vmshield")
DISKS = ("web1-0", "web1-1", "web1-2")
#: each keyslot written by the passwd under test costs ~0.3 s of PBKDF2: time to signal it
SLOW = ("--pbkdf-iterations", "300000")


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    path = tmp_path / "ks.db"
    inproc(path, "init")
    inproc(path, "user", "add", "alice", secret=PW + b"\n")
    inproc(path, "vm", "add", "web1", "--owner", "alice")
    for _ in DISKS:
        inproc(path, "disk", "create", "web1", "--size", "1M", "--format", "luks1",
               "--pbkdf-iterations", "1000", secret=PW + b"\n")  # fmt: skip
    return path


def _image(db: Path, disk: str) -> str:
    return str(db.parent / "disks" / f"{disk}.img")


def _opens(path: str, secret: bytes) -> bool:
    try:
        luks.open_volume(path, secret, readonly=True).close()
    except InvalidPassphrase:
        return False
    return True


def _takes(db: Path) -> dict[str, tuple[bool, bool]]:
    """What each disk and the verifier take now: name -> (old opens, new opens). A disk
    with one keyslot opens with one passphrase: only the old one is tried there."""
    out = {}
    for d in DISKS:
        path = _image(db, d)
        slots = [s for s in luks.info(path)["keyslots"] if s.get("active")]
        if len(slots) == 1:
            old = _opens(path, PW)
            out[d] = (old, not old and _opens(path, NEW_PW))
        else:
            out[d] = (_opens(path, PW), _opens(path, NEW_PW))
    with sqlite3.connect(db) as conn:
        (verifier,) = conn.execute("SELECT verifier FROM principals WHERE name='alice'").fetchone()
    out["verifier"] = (FAST.verify(verifier, PW), FAST.verify(verifier, NEW_PW))
    return out


def _all(db: Path, old: bool) -> None:
    assert set(_takes(db).values()) == {(old, not old)}, _takes(db)


def _audit(db: Path) -> list[dict[str, object]]:
    p = subprocess.run(
        [VMSHIELD, "audit", "--json"],
        capture_output=True,
        env={**os.environ, "VMSHIELD_DB": str(db)},
        check=True,
    )
    rows: list[dict[str, object]] = json.loads(p.stdout)
    return rows


def _start(db: Path, new: bytes = NEW_PW) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [VMSHIELD, "user", "passwd", "alice", *SLOW],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "VMSHIELD_DB": str(db)},
    )
    assert p.stdin is not None
    p.stdin.write(PW + b"\n" + new + b"\n" + new + b"\n")
    p.stdin.close()
    return p


def _wait_for(p: subprocess.Popen[bytes], db: Path, done: int) -> None:
    """Until `done` disks were re-keyed (0: until the journal exists, before the first)."""
    assert p.stderr is not None
    if done == 0:
        journal = db.parent / "passwd" / "alice.json"
        deadline = time.monotonic() + 60
        while not journal.exists():
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        return
    while True:
        line = p.stderr.readline().decode()
        assert line, "passwd ended before the signal"
        if f"({done}/{len(DISKS)})" in line:
            return


def _finish(p: subprocess.Popen[bytes]) -> tuple[int, str]:
    assert p.stderr is not None and p.stdout is not None
    err = p.stderr.read().decode()
    p.stdout.read()
    return p.wait(timeout=120), err


@pytest.mark.parametrize(
    ("sig", "after"),
    [(signal.SIGINT, 0), (signal.SIGINT, 1), (signal.SIGTERM, 2)],
    ids=["sigint-before-any", "sigint-after-one", "sigterm-after-two"],
)
def test_a_signal_moves_every_disk_back(db: Path, sig: int, after: int) -> None:
    p = _start(db)
    _wait_for(p, db, after)
    p.send_signal(sig)
    code, err = _finish(p)
    assert code == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"interrupted by {name}" in err and "still take the current password" in err
    assert "Traceback" not in err
    _all(db, old=True)
    assert not (db.parent / "passwd" / "alice.json").exists()
    audit = _audit(db)
    steps = [a["detail"] for a in audit if a["action"] == "user.passwd.disk"]  # type: ignore[index]
    moved = [s["disk"] for s in steps if s["step"] == "rekeyed"]  # type: ignore[index]
    assert len(moved) >= after and sorted(moved) == sorted(
        s["disk"]
        for s in steps
        if s["step"] == "restored"  # type: ignore[index]
    )
    assert audit[-1]["action"] == "user.passwd.interrupted"


@pytest.mark.slow
def test_after_sigkill_the_same_command_completes_it(db: Path) -> None:
    p = _start(db)
    _wait_for(p, db, 1)
    p.kill()
    p.wait(timeout=60)
    takes = _takes(db)
    assert takes["verifier"] == (True, False) and takes["web1-0"] == (False, True)
    assert (db.parent / "passwd" / "alice.json").exists()
    # another new password cannot complete it: refused, nothing lost, journal kept
    code, err = _finish(_start(db, new=b"third-password-42"))
    assert code == 1 and "web1-0" in err and "Traceback" not in err, err
    assert "an interrupted password change moved it" in err
    assert _takes(db) == takes  # what the third password had moved was moved back
    assert (db.parent / "passwd" / "alice.json").exists()
    code, err = _finish(_start(db))
    assert code == 0 and "completing the password change" in err, err
    _all(db, old=False)
    assert not (db.parent / "passwd" / "alice.json").exists()
    actions = [a["action"] for a in _audit(db)]
    assert "user.passwd.resume" in actions and actions[-1] == "user.passwd"
